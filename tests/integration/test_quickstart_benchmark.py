"""benchmarks/quickstart.py at a tiny size: the quickstart's schedule (offline SeqKD, then online DPKD on
stored teacher answers) run through raykd's CLI on a local Ray cluster, as shipped and with one variant;
the rates are recomputed here from each run's files and the memory breakdown names the run's parts."""

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
    cmd = [sys.executable, str(ROOT / "benchmarks" / "quickstart.py"), "--tiny", "--work", str(tmp_path / "work"),
           *extra]
    return subprocess.run(cmd, env=dict(os.environ, RAY_ADDRESS=""), capture_output=True, text=True, timeout=600)


def test_quickstart_benchmark_measures_each_phase_and_the_memory_of_each_part(tmp_path):
    done = run_benchmark(tmp_path, "--variant", "sampler.max_in_flight=1; learner.lr=0.0005")
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert [r["variant"] for r in result["runs"]] == ["as shipped", "sampler.max_in_flight=1; learner.lr=0.0005"]
    for j, r in enumerate(result["runs"]):
        run_dir = tmp_path / "work" / f"v{j}-0"
        written = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert written["sampler"]["max_in_flight"] == (2 if j == 0 else 1)  # the variant reached its run only
        rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [row["phase_kind"] for row in rows] == ["offline"] * 3 + ["online"] * 4
        # offline: steps 2..3 from the end of step 1; online: its 4 steps from the end of the offline phase
        assert r["steps_per_s"]["0:offline"] == pytest.approx(2 / (rows[2]["elapsed_s"] - rows[0]["elapsed_s"]))
        assert r["steps_per_s"]["1:online"] == pytest.approx(4 / (rows[6]["elapsed_s"] - rows[2]["elapsed_s"]))
        assert 0 < r["before_first_step_s"] < r["wall_s"]
        summary = json.loads((run_dir / "summary.json").read_text())
        assert r["teacher_busy_s"] == pytest.approx(summary["teachers"][0]["busy_s"]) and r["teacher_busy_s"] > 0
        assert r["after_rouge_l"] == pytest.approx(summary["eval_after"]["rouge_l"])
        # the tree's peak: the driver, Ray's services and each actor class, adding up to the peak RSS
        roles = r["rss_mb_at_peak_by_role"]
        for part in ("driver", "TeacherWorker", "StudentSampler", "Learner", "ReplayBuffer"):
            assert roles.get(part, 0) > 50, (part, roles)
        assert roles.get("Ray services (GCS, raylet, dashboard, agents)", 0) > 50, roles
        assert sum(roles.values()) == pytest.approx(r["peak_rss_mb"], rel=1e-6)
        assert 0 < r["peak_pss_mb"] <= r["peak_rss_mb"]
        assert r["peak_used_over_idle_mb"] > 200  # a Ray cluster and five actors at least
    shipped, variant = result["means"]["as shipped"], result["means"]["sampler.max_in_flight=1; learner.lr=0.0005"]
    ratio = result["ratio_to_shipped"]["sampler.max_in_flight=1; learner.lr=0.0005"]
    assert ratio["peak_rss_mb"] == pytest.approx(variant["peak_rss_mb"] / shipped["peak_rss_mb"])
    assert "RSS MB at the peak, as shipped run 0: " in done.stdout


def test_quickstart_benchmark_refuses_a_bad_variant_before_any_run(tmp_path):
    done = run_benchmark(tmp_path, "--variant", "sampler.max_in_flight=0")
    assert done.returncode != 0
    assert "--variant 'sampler.max_in_flight=0': sampler.max_in_flight=0: must be a positive integer" in done.stderr
    assert not list((tmp_path / "work").glob("v*-0"))
