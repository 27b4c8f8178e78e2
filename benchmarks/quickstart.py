"""The quickstart (``configs/quickstart.yaml``) measured end to end: time, work and peak memory, as shipped
and with config variants side by side.

    python benchmarks/quickstart.py                  # the quickstart as shipped, one run
    python benchmarks/quickstart.py --runs 2 \\
        --variant "teacher.engine.kv_cache_gb=0.25;sampler.engine.kv_cache_gb=0.25"
    python benchmarks/quickstart.py --tiny           # random tiny models, a few steps (its test)

Each run is ``python -m driver.cli train configs/quickstart.yaml`` in a subprocess (the config as shipped,
then each ``--variant``: ``KEY=VALUE`` overrides joined by ``;``, as ``raykd train --set`` takes them),
variants alternated run by run. Reported per run:

- wall time of the subprocess (start-up, the offline phase's teacher data, the held-out scoring included)
  and the time before the first training step;
- each phase's steps/s: its steps over the time from the end of the phase before (or of the first step,
  for the first phase) to its last step;
- the teacher's and the sampler's busy seconds (inside their engines' calls, summed over replicas);
- peak memory: the summed RSS and PSS of the run's process tree (driver, Ray's services, every actor
  and their subprocesses), the machine's used memory (total less available: shared memory counted once)
  over what it was when the run began, and the RSS of each part at the moment the tree's sum peaked;
- the held-out scores after training (exact match, Rouge-L, answer rate).

Then each variant's wall time, peak memory and steps/s per phase over the shipped config's (means over
runs). The last stdout line is one JSON object with every number.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import yaml  # noqa: E402

from vs_trl import emit_result, mean, print_table, run_measured  # noqa: E402

SHIPPED = "as shipped"


def quickstart_config(work: Path | None = None) -> dict:
    """``configs/quickstart.yaml`` as a dict; with ``work``, shrunk to random tiny models (made there),
    HF engines, 32 prompts and 8 new tokens (the benchmarks' tests)."""
    cfg = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())
    if work is not None:
        from kd.models import make_tiny_model

        cfg["models"] = {"teacher": str(make_tiny_model(work / "tiny-teacher", 4, 0)),
                         "student": str(make_tiny_model(work / "tiny-student", 2, 1)), "student_keep_layers": None}
        cfg["data"]["num_prompts"] = 32
        for side in ("teacher", "sampler"):
            cfg[side]["max_new_tokens"] = 8
            cfg[side]["engine"] = {"backend": "hf"}
    return cfg


def tiny_config(work: Path) -> Path:
    """The quickstart's schedule on tiny models with a few steps (the test's size), written to a file."""
    cfg = quickstart_config(work)
    cfg["schedule"][0]["steps"], cfg["schedule"][1]["steps"] = 3, 4
    cfg["eval"].update(limit=4, max_new_tokens=8)
    path = work / "quickstart-tiny.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def parse_variant(text: str) -> list[str]:
    return [kv.strip() for kv in text.split(";") if kv.strip()]


def measure(run_dir: Path) -> dict:
    """A finished run's time per phase, busy time and held-out scores, from its metrics.jsonl and summary."""
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    summary = json.loads((run_dir / "summary.json").read_text())
    phases = {}
    end_before = rows[0]["elapsed_s"]  # the first phase is timed from the end of its first step
    for phase in sorted({r["phase"] for r in rows}):
        mine = [r for r in rows if r["phase"] == phase]
        steps = len(mine) - (1 if phase == rows[0]["phase"] else 0)
        span = mine[-1]["elapsed_s"] - end_before
        phases[f"{phase}:{mine[0]['phase_kind']}"] = steps / span if steps and span > 0 else None
        end_before = mine[-1]["elapsed_s"]
    after = summary.get("eval_after") or {}
    return {
        "steps": len(rows),
        "before_first_step_s": rows[0]["elapsed_s"] - rows[0]["step_time_s"],
        "steps_per_s": phases,
        "teacher_busy_s": sum(t.get("busy_s", 0.0) for t in summary["teachers"]),
        "sampler_busy_s": sum(s.get("busy_s", 0.0) for s in summary["samplers"]),
        **{f"after_{k}": after.get(k) for k in ("exact_match", "rouge_l", "answer_rate")},
    }


def report(runs: list[dict], variants: list[str]) -> dict:
    for r in runs:
        for phase, rate in r["steps_per_s"].items():
            r[f"steps/s {phase}"] = rate
    phase_cols = sorted({k for r in runs for k in r if k.startswith("steps/s ")})
    print_table([("variant", "variant", "<40"), ("run", "run", ">3"), ("wall s", "wall_s", ">7.1f"),
                 ("to step 1 s", "before_first_step_s", ">11.1f"),
                 *[(c, c, ">18.4f") for c in phase_cols],
                 ("teacher busy s", "teacher_busy_s", ">14.1f"), ("sampler busy s", "sampler_busy_s", ">14.1f"),
                 ("peak RSS MB", "peak_rss_mb", ">11.0f"), ("peak PSS MB", "peak_pss_mb", ">11.0f"),
                 ("used over idle MB", "peak_used_over_idle_mb", ">17.0f"),
                 ("Rouge-L", "after_rouge_l", ">7.3f"), ("EM", "after_exact_match", ">5.3f")], runs)
    for r in runs:
        parts = ", ".join(f"{role} {mb:.0f}" for role, mb in r["rss_mb_at_peak_by_role"].items())
        print(f"RSS MB at the peak, {r['variant']} run {r['run']}: {parts}")
    keys = ["wall_s", "peak_rss_mb", "peak_pss_mb", "peak_used_over_idle_mb", *phase_cols]
    means = {v: {k: mean([r[k] for r in runs if r["variant"] == v and r.get(k) is not None] or [float("nan")])
                 for k in keys} for v in variants}
    ratios = {v: {k: means[v][k] / means[SHIPPED][k] for k in keys} for v in variants[1:]}
    for v, ratio in ratios.items():
        print(f"{v} over {SHIPPED}: " + ", ".join(f"{k} {x:.2f}x" for k, x in ratio.items()))
    return {"runs": runs, "means": means, "ratio_to_shipped": ratios}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variant", action="append", default=[], metavar="KEY=VALUE[;KEY=VALUE...]",
                    help="config overrides run beside the shipped config (repeatable: one variant each)")
    ap.add_argument("--runs", type=int, default=1, help="runs per variant, alternated")
    ap.add_argument("--work", default="runs/quickstart-bench", help="scratch directory (runs and logs)")
    ap.add_argument("--json-out", default=None, help="also write the JSON result to this file")
    ap.add_argument("--tiny", action="store_true", help="random tiny models and HF engines, a few steps (its test)")
    args = ap.parse_args(argv)
    if args.runs < 1:
        raise SystemExit("quickstart: --runs must be >= 1")
    from driver.config import ConfigError, load_config

    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    cfg_file = tiny_config(work) if args.tiny else ROOT / "configs" / "quickstart.yaml"
    variants = {SHIPPED: []}
    for text in args.variant:
        overrides = parse_variant(text)
        try:  # a bad override is refused here, before any run, with the config's own message
            load_config(str(cfg_file), overrides)
        except ConfigError as e:
            raise SystemExit(f"quickstart: --variant {text!r}: {e}") from None
        if not overrides:
            raise SystemExit(f"quickstart: --variant {text!r}: no KEY=VALUE in it")
        variants["; ".join(overrides)] = overrides
    env = dict(os.environ, PYTHONPATH=str(ROOT), RAY_ADDRESS="", TOKENIZERS_PARALLELISM="false")
    runs = []
    for i in range(args.runs):
        for j, (name, overrides) in enumerate(variants.items()):
            print(f"quickstart: {name} run {i + 1}/{args.runs} ...", file=sys.stderr, flush=True)
            out = work / f"v{j}-{i}"
            shutil.rmtree(out, ignore_errors=True)
            cmd = [sys.executable, "-m", "driver.cli", "train", str(cfg_file), "--run-dir", str(out), "--no-progress"]
            for kv in overrides:
                cmd += ["--set", kv]
            measured = run_measured(cmd, work / f"v{j}-{i}.log", env)
            runs.append({"variant": name, "run": i, "run_dir": str(out), **measured, **measure(out)})
    result = {"setting": {"config": str(cfg_file), "runs": args.runs, "tiny": args.tiny, "variants": variants},
              **report(runs, list(variants))}
    emit_result(result, args.json_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
