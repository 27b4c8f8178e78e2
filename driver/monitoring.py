"""What a person watches while a run goes: metrics.jsonl, a terminal progress bar, the end summary.

(The Ray-side Prometheus metrics are in ``actors/metrics.py``; ``raykd report`` plots metrics.jsonl.)
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from kd.errors import UserInputError


class MetricsFileError(UserInputError):
    """metrics.jsonl missing, empty or unreadable; the message names the file (and line)."""


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None  # JSON has no NaN; a reader sees null
    return v


class MetricsLog:
    """Appends one JSON line per step; remembers the first and last rows for the summary."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.first: dict = {}
        self.last: dict = {}

    def write(self, row: dict) -> None:
        row = {k: _clean(v) for k, v in row.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        self.first = self.first or row
        self.last = row


def read_metrics(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl; a missing/empty file or a bad line is a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise MetricsFileError(f"{path}: no such file (is this a raykd run directory?)")
    rows = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise MetricsFileError(f"{path}:{i}: invalid JSON: {e.msg}") from None
            if not isinstance(row, dict):
                raise MetricsFileError(f"{path}:{i}: expected a JSON object")
            rows.append(row)
    if not rows:
        raise MetricsFileError(f"{path}: empty (the run logged no step)")
    return rows


def _num(v) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def _fmt(v, spec: str = ".4g") -> str:
    v = _num(v)
    return "-" if v is None else format(v, spec)


def progress_postfix(row: dict, buffer_capacity: int | None = None) -> dict[str, str]:
    """The progress bar's fields for one metrics row: loss, samples/s, buffer fill, lag, version, and
    student/teacher top-1 agreement and the eval metrics when the row has them. Missing or null values
    show as '-'."""
    size = row.get("buffer_size")
    buffer = "-" if size is None else (f"{size}/{buffer_capacity}" if buffer_capacity else str(size))
    out = {
        "loss": _fmt(row.get("loss"), ".4f"),
        "samples/s": _fmt(row.get("samples_per_s"), ".2f"),
        "buffer": buffer,
        "lag": _fmt(row.get("policy_lag"), ".2f"),
        "v": str(row.get("policy_version", "-")),
    }
    if _num(row.get("top1_agreement")) is not None:  # distillation health: student/teacher top-1 agree
        out["top1"] = _fmt(row["top1_agreement"], ".2f")
    for key in ("eval_exact_match", "eval_rouge_l"):
        if _num(row.get(key)) is not None:
            out[key.removeprefix("eval_")] = _fmt(row[key], ".3f")
    return out


class ProgressBar:
    """A tqdm bar over training steps (the bar's count is the step)."""

    def __init__(self, total: int, enabled: bool = True, buffer_capacity: int | None = None,
                 initial: int = 0):
        self.bar = None
        self.buffer_capacity = buffer_capacity
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)

    def update(self, row: dict) -> None:
        if self.bar is None:
            return
        self.bar.set_postfix(progress_postfix(row, self.buffer_capacity), refresh=False)
        self.bar.update(1)

    def reset_to(self, step: int) -> None:
        """Move the count back (the run rewound to a checkpoint)."""
        if self.bar is not None:
            self.bar.n = step
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _duration(seconds) -> str:
    s = _num(seconds)
    if s is None:
        return "-"
    if s < 60:
        return f"{s:.1f}s"
    m, s = divmod(int(round(s)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def _one_line(text, width: int = 100, keep_end: bool = False) -> str:
    text = " ".join(str(text).split())
    if len(text) <= width:
        return text
    return "..." + text[-(width - 3):] if keep_end else text[: width - 3] + "..."


def _held_out_lines(summary: dict) -> list[str]:
    """'held-out  exact_match 0.000 -> 0.125 (teacher 0.250)' per metric, from eval_before/_after/_teacher."""
    before, after = summary.get("eval_before") or {}, summary.get("eval_after") or {}
    teacher = summary.get("eval_teacher") or {}
    lines = []
    for key in ("exact_match", "rouge_l", "answer_rate"):
        if key not in before and key not in after:
            continue
        text = f"{_fmt(before.get(key), '.3f')} -> {_fmt(after.get(key), '.3f')}"
        if _num(teacher.get(key)) is not None:
            text += f" (teacher {_fmt(teacher[key], '.3f')})"
        lines.append(f"{'held-out' if not lines else '':<13}{key} {text}")
    return lines


def format_summary(summary: dict) -> str:
    """A short human-readable block for the end of a run, from the dict written to summary.json.
    Every key is optional: what is missing is left out."""
    lines = ["== raykd run summary =="]
    steps, wall = summary.get("steps"), _num(summary.get("wall_s"))
    if steps is not None:
        rate = f" ({steps / wall:.3g} steps/s)" if wall else ""
        lines.append(f"steps        {steps} in {_duration(wall)}{rate}")
    if summary.get("policy_version") is not None:
        lines.append(f"policy       version {summary['policy_version']}")
    if "first_loss" in summary or "last_loss" in summary:
        lines.append(f"loss         {_fmt(summary.get('first_loss'))} -> {_fmt(summary.get('last_loss'))}")
    if summary.get("pairs_added") is not None:
        pairs = f"pairs        {summary['pairs_added']} added"
        if wall:
            pairs += f" ({summary['pairs_added'] / wall:.3g}/s)"
        by_teacher = summary.get("pairs_by_teacher") or {}
        if len(by_teacher) > 1:  # several teacher pools (teachers:): each one's share
            pairs += "; by teacher: " + ", ".join(f"{k} {v}" for k, v in by_teacher.items())
        lines.append(pairs)
    if summary.get("skipped_overlong"):  # nothing to say when none was skipped
        lines.append(f"skipped      {summary['skipped_overlong']} over-long prompts (data.on_overlong=skip)")
    buf = summary.get("buffer") or {}
    if buf:
        size = f"{buf.get('size', '-')}/{buf['capacity']}" if buf.get("capacity") else str(buf.get("size", "-"))
        keys = ("inserted", "consumed", "dropped_stale", "evicted", "mean_policy_lag")
        parts = [f"size {size}"] + [f"{k.replace('_', ' ')} {_fmt(buf[k], '.3g')}" for k in keys if k in buf]
        lines.append("buffer       " + ", ".join(parts))
    evals = {k: v for k, v in summary.items()
             if k.startswith("eval_") and k != "eval_s" and not k.endswith("_std") and _num(v) is not None}
    if evals:
        lines.append("eval         " + ", ".join(f"{k.removeprefix('eval_')} {_fmt(v, '.3f')}"
                                                   for k, v in evals.items()))
    lines += _held_out_lines(summary)
    probe = summary.get("probe") or {}
    if probe:
        if probe.get("prompt"):
            lines.append(f"probe prompt {_one_line(probe['prompt'], keep_end=True)!r}")  # the question ends it
        lines.append(f"  before     {_one_line(probe.get('before', ''))!r}")
        if probe.get("after") is not None:
            lines.append(f"  after      {_one_line(probe['after'])!r}")
    for name in summary.get("lost_actors") or {}:
        lines.append(f"lost         {name} (its node is gone; nothing else could hold it)")
    if summary.get("final_model"):
        lines.append(f"final model  {summary['final_model']}")
    return "\n".join(lines)
