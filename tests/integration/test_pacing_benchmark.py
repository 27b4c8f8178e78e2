"""benchmarks/pacing.py at a tiny size: the quickstart's online phase run once per pacing mode through
raykd's CLI on a local Ray cluster, with the steady-state rates recomputed here from each run's files."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def run_benchmark(tmp_path, *extra):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "pacing.py"), "--tiny", "--work", str(tmp_path / "work"), *extra]
    return subprocess.run(cmd, env=dict(os.environ, RAY_ADDRESS=""), capture_output=True, text=True, timeout=600)


def test_pacing_benchmark_runs_each_mode_and_reports_the_ratio(tmp_path):
    done = run_benchmark(tmp_path, "--modes", "2,auto", "--set", "sampler.max_in_flight=3")
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert [r["mode"] for r in result["runs"]] == ["2", "auto"]
    for r in result["runs"]:
        written = yaml.safe_load((tmp_path / "work" / f"ahead-{r['mode']}-0" / "config.yaml").read_text())
        assert written["sampler"]["max_steps_ahead"] == (2 if r["mode"] == "2" else "auto")
        assert written["sampler"]["max_in_flight"] == 3  # --set reached every run
        rows = [json.loads(ln) for ln in (tmp_path / "work" / f"ahead-{r['mode']}-0" / "metrics.jsonl")
                .read_text().splitlines()]
        assert len(rows) == r["steps"] == 4
        # steps 2..4 over the time from the end of step 1 (--skip-steps 1 at --tiny)
        assert r["steady_steps_per_s"] == pytest.approx(3 / (rows[3]["elapsed_s"] - rows[0]["elapsed_s"]))
        assert 0 < r["learner_busy"] <= 1
        summary = json.loads((tmp_path / "work" / f"ahead-{r['mode']}-0" / "summary.json").read_text())
        assert r["pairs_per_trained"] == pytest.approx(summary["pairs_added"] / (4 * 8))
        assert r["pairs_per_trained"] >= 1  # every trained row was made once at least
    # a fixed bound is kept as set; auto stays within [2, max_policy_lag x every_steps] = [2, 4]
    assert result["runs"][0]["steps_ahead_last"] == 2
    assert 2 <= result["runs"][1]["steps_ahead_last"] <= 4
    speed = result["mean_steps_per_s"]
    assert result["ratio_to_first"]["auto"] == pytest.approx(speed["auto"] / speed["2"])
    assert "max_steps_ahead" in done.stdout


def test_pacing_benchmark_refuses_a_bad_mode_or_override_before_any_run(tmp_path):
    done = run_benchmark(tmp_path, "--modes", "2,soon")
    assert done.returncode != 0
    assert "--modes soon: sampler.max_steps_ahead='soon'" in done.stderr
    done = run_benchmark(tmp_path, "--set", "sampler.max_in_flight=0")
    assert done.returncode != 0
    assert "--set: sampler.max_in_flight=0: must be a positive integer" in done.stderr
    assert not list((tmp_path / "work").glob("ahead-*"))
