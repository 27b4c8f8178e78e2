"""Run directories, checkpoint manifests and ``--resume``: everything decided before any actor starts.

- A new run never lands in a directory that holds another run (``--overwrite`` clears one on purpose).
- Every checkpoint carries ``manifest.json`` (each file's path, size and sha256), written last before
  the checkpoint directory is renamed into place. Resume verifies checkpoints newest first, uses the
  newest intact one and sets damaged ones aside as ``checkpoints/damaged-step-NNNNNN``.
- The run's saved ``config.yaml`` is what a resume continues; a different config is refused unless
  ``--allow-config-change`` (then every change is appended to ``config_changes.jsonl``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from driver.config import Config, PhaseConfig, dump_config, load_config
from kd.errors import UserInputError

MANIFEST = "manifest.json"
_CHUNK = 1 << 20
_RUN_MARKERS = ("config.yaml", "checkpoints", "metrics.jsonl", "consumed.jsonl", "summary.json")


class RunDirError(UserInputError):
    """A run directory or checkpoint that cannot be used as asked."""


# -- checkpoint manifests ---------------------------------------------------------------------------

def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(ckpt: Path) -> None:
    """Record every file under ``ckpt``; call it last, before the directory is renamed into place."""
    files = sorted(p for p in ckpt.rglob("*") if p.is_file() and p.name != MANIFEST)
    entries = [{"path": p.relative_to(ckpt).as_posix(), "size": p.stat().st_size, "sha256": file_digest(p)}
               for p in files]
    tmp = ckpt / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps({"files": entries}, indent=0))
    os.replace(tmp, ckpt / MANIFEST)


def verify_checkpoint(ckpt: Path) -> str | None:
    """None when every file the manifest lists is there, whole and unchanged; else what is wrong."""
    try:
        entries = json.loads((ckpt / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        return _unlisted_problem(ckpt)
    except (ValueError, KeyError, TypeError):
        return f"{MANIFEST} is unreadable"
    for e in entries:
        p = ckpt / e["path"]
        if not p.is_file():
            return f"{e['path']} is missing"
        if p.stat().st_size != e["size"]:
            return f"{e['path']} has {p.stat().st_size} bytes, expected {e['size']}"
        if file_digest(p) != e["sha256"]:
            return f"{e['path']} does not match its checksum"
    if "driver_state.json" not in {e["path"] for e in entries}:
        return "driver_state.json is missing"
    return None


def _unlisted_problem(ckpt: Path) -> str | None:
    """A checkpoint without a manifest (written before manifests existed): its parts must at least
    be there and readable."""
    import pyarrow.parquet as pq

    try:
        json.loads((ckpt / "driver_state.json").read_text())["step"]
    except FileNotFoundError:
        return f"no {MANIFEST}, and driver_state.json is missing"
    except (ValueError, KeyError, TypeError):
        return f"no {MANIFEST}, and driver_state.json is unreadable"
    try:
        pq.read_metadata(ckpt / "buffer.parquet")
    except Exception:  # noqa: BLE001 - missing or not Parquet: either way unusable
        return f"no {MANIFEST}, and buffer.parquet is missing or unreadable"
    if not (ckpt / "learner").is_dir() or not any((ckpt / "learner").iterdir()):
        return f"no {MANIFEST}, and learner/ is missing or empty"
    return None


def dir_bytes(path: Path) -> int:
    """The bytes of every file under ``path`` (0 if it does not exist)."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


def save_failed_on_a_full_disk(where: Path, step: int, error: BaseException, need: int,
                               run_dir: Path) -> RunDirError | None:
    """The clear error for a checkpoint save that failed because ``where``'s disk is (nearly) full:
    less free than ``need`` bytes (the last checkpoint's size) plus 64 MiB. None when there is room,
    so the save's own error stands. Libraries report a full disk obscurely (torch.save: "unexpected
    pos ... vs ..."), so the free space is checked rather than the message."""
    free = shutil.disk_usage(where).free
    if free >= need + (64 << 20):
        return None
    first = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
    return RunDirError(
        f"{where}: saving the step-{step:06d} checkpoint failed with {free / 2**20:.0f} MiB free on its disk "
        f"(a checkpoint here takes {need / 2**20:.0f} MiB): {first[:200]}. The previous checkpoint is intact; "
        f"free some space, then continue with: raykd train --resume {run_dir}")


def checkpoint_step(ckpt: Path) -> int:
    return int(ckpt.name.rsplit("-", 1)[-1])


def scan_checkpoints(run_dir: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest intact checkpoint and the damaged ones newer than it (newest first)."""
    damaged = []
    for ckpt in sorted((run_dir / "checkpoints").glob("step-*"), reverse=True):
        problem = verify_checkpoint(ckpt)
        if problem is None:
            return ckpt, damaged
        damaged.append((ckpt, problem))
    return None, damaged


def aside_name(ckpt: Path) -> Path:
    target, n = ckpt.with_name(f"damaged-{ckpt.name}"), 2
    while target.exists():
        target, n = ckpt.with_name(f"damaged-{ckpt.name}-{n}"), n + 1
    return target


def warn_damaged(damaged: list[tuple[Path, str]], using: Path | None) -> None:
    for ckpt, problem in damaged:
        print(f"raykd: warning: checkpoint {ckpt.name} is damaged ({problem}); kept as "
              f"{aside_name(ckpt).name}; using {using.name if using else 'none'}", file=sys.stderr)


def set_aside(damaged: list[tuple[Path, str]]) -> None:
    for ckpt, _ in damaged:
        if ckpt.exists():
            os.replace(ckpt, aside_name(ckpt))


def intact_checkpoint(run_dir: Path) -> Path | None:
    """The newest intact checkpoint; damaged newer ones are reported and set aside (mid-run use)."""
    ckpt, damaged = scan_checkpoints(run_dir)
    warn_damaged(damaged, ckpt)
    set_aside(damaged)
    return ckpt


# -- new runs ---------------------------------------------------------------------------------------

def looks_like_run(path: Path) -> bool:
    return any((path / m).exists() for m in _RUN_MARKERS)


def claim_run_dir(cfg: Config, run_dir: str | None, overwrite: bool = False) -> Path:
    """Where a new run goes. Nothing is written here: ``prepare`` creates (or, with ``overwrite``,
    clears) the directory once every other check passed."""
    if run_dir is None:
        base = Path(cfg.run.runs_dir) / f"{cfg.run.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        path, n = base, 2
        while path.exists():
            path, n = base.with_name(f"{base.name}-{n}"), n + 1
        return path
    path = Path(run_dir)
    if path.exists() and not path.is_dir():
        raise RunDirError(f"--run-dir {path} is a file, not a directory")
    if path.is_dir() and any(path.iterdir()):
        if not looks_like_run(path):
            raise RunDirError(f"--run-dir {path} is not empty and holds no raykd run; choose an empty or new directory")
        if not overwrite:
            raise RunDirError(f"--run-dir {path} already holds a run; continue it with `raykd train --resume {path}` "
                              "or start over (deleting it) with --overwrite")
    return path


def clear_run_dir(path: Path) -> None:
    if path.is_dir() and looks_like_run(path):
        shutil.rmtree(path)


# -- resume -----------------------------------------------------------------------------------------

def flatten(value, prefix: str = "") -> dict:
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else k))
        return out
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        out = {}
        for i, v in enumerate(value):
            out.update(flatten(v, f"{prefix}[{i}]"))
        return out
    return {prefix: value}


def config_changes(old: Config, new: Config) -> list[tuple[str, object, object]]:
    a, b = flatten(old.to_dict()), flatten(new.to_dict())
    return [(k, a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]


def _fmt(changes) -> str:
    return ", ".join(f"{k}: {json.dumps(o)} -> {json.dumps(n)}" for k, o, n in changes)


@dataclass
class ResumePlan:
    run_dir: Path
    cfg: Config
    checkpoint: Path
    step: int
    changes: list = field(default_factory=list)
    damaged: list = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return self.step >= self.cfg.total_steps()


def _saved_config(run: Path) -> Path:
    if not run.exists():
        raise RunDirError(f"--resume {run}: no such run directory")
    if not run.is_dir():
        raise RunDirError(f"--resume {run}: is a file, not a run directory")
    saved = run / "config.yaml"
    if not saved.is_file():
        raise RunDirError(f"--resume {run}: no config.yaml there (not a raykd run directory)")
    return saved


def plan_resume(run_dir: str | Path, config: str | None = None, overrides: list[str] | None = None,
                allow_change: bool = False) -> ResumePlan:
    """Check a resume without writing anything: the saved config against any new one, and the
    checkpoints newest first. Raises ``RunDirError`` (one line) when it must not go ahead."""
    run = Path(run_dir)
    saved_path = _saved_config(run)
    saved = load_config(saved_path, saved=True)
    cfg = load_config(config or saved_path, overrides, saved=config is None) if (config or overrides) else saved
    ckpt, damaged = scan_checkpoints(run)
    if ckpt is None:
        why = "; ".join(f"{c.name}: {p}" for c, p in damaged) or "none written yet"
        raise RunDirError(f"--resume {run}: no intact checkpoint under {run / 'checkpoints'} ({why})")
    step, changes = checkpoint_step(ckpt), config_changes(saved, cfg)
    if cfg.total_steps() < step:
        raise RunDirError(f"--resume {run}: the config ends at step {cfg.total_steps()}, before the checkpoint "
                          f"{ckpt.name}; a resume never goes back ({_fmt(changes)})")
    if changes and not allow_change:
        raise RunDirError(f"--resume {run}: config differs from the run's config.yaml: {_fmt(changes)}; "
                          "resume with no config to continue as saved, or add --allow-config-change")
    warn_damaged(damaged, ckpt)
    return ResumePlan(run, cfg, ckpt, step, changes, damaged)


def commit_resume(plan: ResumePlan) -> None:
    """Once every check passed: set damaged checkpoints aside, record and save config changes."""
    set_aside(plan.damaged)
    if not plan.changes:
        return
    now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    with open(plan.run_dir / "config_changes.jsonl", "a") as f:
        for key, old, new in plan.changes:
            f.write(json.dumps({"time": now, "checkpoint_step": plan.step, "key": key, "old": old, "new": new}) + "\n")
    tmp = plan.run_dir / ".config.yaml.tmp"
    dump_config(plan.cfg, tmp)
    os.replace(tmp, plan.run_dir / "config.yaml")


# -- where a step lies in a schedule -------------------------------------------------------------------

def phase_position(phases: list[PhaseConfig], step: int, index: int, phase_step: int) -> tuple[int, int]:
    """(phase index, step within it) for global ``step``; the saved pair when it agrees with this
    schedule (a config change may have moved phase boundaries or extended a finished run)."""
    starts = [sum(p.steps for p in phases[:i]) for i in range(len(phases) + 1)]
    if index < len(phases) and starts[index] + phase_step == step and phase_step <= phases[index].steps:
        return index, phase_step
    for i, p in enumerate(phases):
        if step < starts[i] + p.steps:
            return i, step - starts[i]
    return len(phases), 0
