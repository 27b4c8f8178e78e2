"""The producers' pacing (``sampler.max_steps_ahead``) side by side on the quickstart's online phase.

    python benchmarks/pacing.py                          # modes 2 and auto, one run each, 12 steps
    python benchmarks/pacing.py --set teacher.engine.backend=simulated --set sampler.engine.backend=simulated
    python benchmarks/pacing.py --modes 0,2,3,auto --runs 2
    python benchmarks/pacing.py --tiny                   # random tiny models, 4 steps (its test)

The job is the online DPKD phase of ``configs/quickstart.yaml`` on its own (teacher SmolLM2-135M-Instruct,
the 8-layer student untrained, 8 prompts per request, batch 8, DPKD beta 0.1 at lr 3e-4, weights pushed
every 2 steps; with no offline phase before it the teacher generates y_t itself), run through raykd's CLI once per mode, modes alternated run by run. Per run it reports
the steady-state steps/s (from the end of step ``--skip-steps`` to the last step), the share of that
time the learner was stepping (its own ``train_step_s``; the rest it waited for rows or for the
driver), the producers' bound at the end (``steps_ahead``), the pairs made per pair trained, the rows
dropped as stale and the mean policy lag of the trained rows, and the wall time of the whole run. Then
each mode's mean steps/s over the first mode's. The last stdout line is one JSON object with every
number.

``--set`` overrides every run's config. With simulated teacher and sampler engines (no model: outputs
of the right shapes after a configured delay, docs/scaling.md) the producers take no CPU from the
learner, as on a cluster where they have their own devices; the second command above measures that.
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

from quickstart import quickstart_config  # noqa: E402
from vs_trl import emit_result, mean, print_table, run_measured, steady_samples_per_s  # noqa: E402


def job_config(steps: int, tiny_work: Path | None) -> dict:
    """The quickstart's online phase alone; ``tiny_work`` (a directory for the models) shrinks it for tests."""
    cfg = quickstart_config(tiny_work)
    online = [p for p in cfg["schedule"] if p["kind"] == "online"][0]
    cfg["run"]["name"] = "pacing"
    # alone, the phase has no offline answers to reuse: the teacher generates y_t (as when measured)
    online.pop("teacher_answers", None)
    cfg["schedule"] = [{**online, "steps": steps}]
    cfg["eval"] = {"before_after": False, "teacher": False}
    cfg["checkpoint"] = {"export_hf": False}
    return cfg


def measure(run_dir: Path, skip: int, batch_size: int) -> dict:
    """The run's numbers from its metrics.jsonl and summary.json."""
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    summary = json.loads((run_dir / "summary.json").read_text())
    steps_per_s = steady_samples_per_s([r["elapsed_s"] for r in rows], 1, skip)  # one "sample" a step
    steady = rows[min(skip, len(rows) - 1):]
    trained = len(rows) * batch_size
    return {
        "steps": len(rows),
        "steady_steps_per_s": steps_per_s,
        "learner_busy": sum(r["train_step_s"] for r in steady) * steps_per_s / len(steady),
        "mean_train_step_s": mean([r["train_step_s"] for r in steady]),
        "steps_ahead_last": rows[-1].get("steps_ahead"),
        "pairs_added": summary["pairs_added"],
        "pairs_per_trained": summary["pairs_added"] / trained,
        "dropped_stale": summary["buffer"]["dropped_stale"],
        "mean_policy_lag": mean([r["policy_lag"] for r in rows]),
    }


def report(runs: list[dict], modes: list[str]) -> dict:
    speed = {m: mean([r["steady_steps_per_s"] for r in runs if r["mode"] == m]) for m in modes}
    print_table([("max_steps_ahead", "mode", ">15"), ("run", "run", ">3"), ("steps/s", "steady_steps_per_s", ">8.4f"),
                 ("learner busy", "learner_busy", ">12.2f"), ("ahead at end", "steps_ahead_last", ">12"),
                 ("pairs/trained", "pairs_per_trained", ">13.2f"), ("stale", "dropped_stale", ">5"),
                 ("lag", "mean_policy_lag", ">5.2f"), ("wall s", "wall_s", ">7.1f")], runs)
    base = modes[0]
    ratios = {m: speed[m] / speed[base] for m in modes}
    print("mean steady steps/s: " + ", ".join(f"{m} {speed[m]:.4f} ({ratios[m]:.2f}x of {base})" for m in modes))
    return {"runs": runs, "mean_steps_per_s": speed, "ratio_to_first": ratios}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--modes", default="2,auto", help="values of sampler.max_steps_ahead, comma-separated; "
                    "the first is the baseline of the ratios (default 2,auto)")
    ap.add_argument("--runs", type=int, default=1, help="runs per mode, alternated")
    ap.add_argument("--steps", type=int, default=None, help="online steps per run; default 12 (--tiny: 4)")
    ap.add_argument("--skip-steps", type=int, default=None, help="steps left out of the steady state; "
                    "default 2 (--tiny: 1)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                    help="a config override for every run (repeatable), as 'raykd train --set' "
                    "(e.g. simulated engines: teacher.engine.backend=simulated)")
    ap.add_argument("--work", default="runs/pacing", help="scratch directory (runs and logs)")
    ap.add_argument("--json-out", default=None, help="also write the JSON result to this file")
    ap.add_argument("--tiny", action="store_true", help="random tiny models and HF engines, 4 steps (its test)")
    args = ap.parse_args(argv)
    if args.steps is None:
        args.steps = 4 if args.tiny else 12
    if args.skip_steps is None:
        args.skip_steps = 1 if args.tiny else 2
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or args.runs < 1 or not 1 <= args.skip_steps < args.steps:
        raise SystemExit("pacing: need --modes, --runs >= 1 and 1 <= --skip-steps < --steps")
    from driver.config import ConfigError, load_config

    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    cfg = job_config(args.steps, work if args.tiny else None)
    cfg_file = work / "job.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg, sort_keys=False))
    try:  # a bad override or mode is refused here, before any run, with the config's own message
        load_config(str(cfg_file), args.overrides)
    except ConfigError as e:
        raise SystemExit(f"pacing: --set: {e}") from None
    for m in modes:
        try:
            load_config(str(cfg_file), [*args.overrides, f"sampler.max_steps_ahead={m}"])
        except ConfigError as e:
            raise SystemExit(f"pacing: --modes {m}: {e}") from None
    env = dict(os.environ, PYTHONPATH=str(ROOT), RAY_ADDRESS="", TOKENIZERS_PARALLELISM="false")
    runs = []
    for i in range(args.runs):
        for m in modes:
            print(f"pacing: max_steps_ahead={m} run {i + 1}/{args.runs} ...", file=sys.stderr, flush=True)
            out = work / f"ahead-{m}-{i}"
            shutil.rmtree(out, ignore_errors=True)
            cmd = [sys.executable, "-m", "driver.cli", "train", str(cfg_file), "--run-dir", str(out),
                   "--no-progress", "--set", f"sampler.max_steps_ahead={m}", "--set", f"run.seed={i}"]
            for kv in args.overrides:
                cmd += ["--set", kv]
            measured = run_measured(cmd, work / f"ahead-{m}-{i}.log", env)
            runs.append({"mode": m, "run": i, **measure(out, args.skip_steps, cfg["learner"]["batch_size"]),
                         "wall_s": measured["wall_s"], "peak_rss_mb": measured["peak_rss_mb"]})
    result = {"setting": {"steps": args.steps, "skip_steps": args.skip_steps, "tiny": args.tiny, "modes": modes,
                          "overrides": args.overrides},
              **report(runs, modes)}
    emit_result(result, args.json_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
