"""benchmarks/vs_trl.py at a tiny size: TRL's GKDTrainer and raykd each train the same tiny on-policy
GKD job in their own subprocess, and the last stdout line reports both."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytest.importorskip("trl")  # the `bench` extra
pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def test_vs_trl_benchmark_runs_both_tools_at_a_tiny_size(tmp_path):
    out = tmp_path / "result.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "vs_trl.py"), "--tiny", "--work", str(tmp_path / "work"),
           "--json-out", str(out), "--raykd-set", "sampler.max_in_flight=1"]
    env = dict(os.environ, RAY_ADDRESS="")
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == json.loads(out.read_text())
    runs = result["runs"]
    assert [r["tool"] for r in runs] == ["trl", "raykd"]  # alternated, TRL first
    for r in runs:
        assert r["steps"] == 4 and r["samples"] == 16
        assert r["steady_samples_per_s"] > 0 and r["wall_s"] > 0
        assert r["peak_rss_mb"] > 100 and 0 < r["peak_pss_mb"] <= r["peak_rss_mb"]  # a Python + torch process
        assert math.isfinite(r["kl_teacher_student"]) and r["kl_teacher_student"] > 0
        assert math.isfinite(r["kl_student_teacher"]) and r["kl_student_teacher"] > 0
        # each tool wrote a final student in Hugging Face format
        assert (Path(r["final_model"]) / "config.json").is_file()
    # the ratio is the two tools' steady-state rates divided, each rate recomputed from its steps
    trl_times = json.loads((tmp_path / "work" / "trl-0" / "steps.json").read_text())["step_times"]
    rows = [json.loads(ln) for ln in (tmp_path / "work" / "raykd-0" / "metrics.jsonl").read_text().splitlines()]
    trl_rate = 4 * 3 / (trl_times[3] - trl_times[0])  # steps 2..4 of batch 4, after skipping step 1
    raykd_rate = 4 * 3 / (rows[3]["elapsed_s"] - rows[0]["elapsed_s"])
    assert runs[0]["steady_samples_per_s"] == pytest.approx(trl_rate)
    assert runs[1]["steady_samples_per_s"] == pytest.approx(raykd_rate)
    assert result["ratio_raykd_over_trl"] == pytest.approx(raykd_rate / trl_rate)
    assert math.isfinite(result["ratio_raykd_over_trl"]) and result["ratio_raykd_over_trl"] > 0
    # the raykd run trained the job's loss on the student's samples only
    assert all("jsd_loss" in r and r["student_rows"] == 1.0 for r in rows)
    assert "raykd/TRL" in done.stdout
    # --raykd-set reached raykd's run (and is recorded with the result)
    written = yaml.safe_load((tmp_path / "work" / "raykd-0" / "config.yaml").read_text())
    assert written["sampler"]["max_in_flight"] == 1
    assert result["setting"]["raykd_set"] == ["sampler.max_in_flight=1"]


def test_vs_trl_benchmark_refuses_an_unknown_tool(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "vs_trl.py"), "--tiny", "--work", str(tmp_path / "work"),
           "--tools", "raykd,openrlhf"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "--tools raykd,openrlhf: choose from trl,raykd" in done.stderr
    assert not (tmp_path / "work").exists()
