"""Losing a whole node mid-run, on a real multi-node local Ray cluster (``ray.cluster_utils.Cluster``):
the node holding one of two teacher replicas is removed once training runs; the run goes on with the
other replica and completes, writes its summary and final model, and neither loses nor repeats a
prompt. Run through the documented benchmark (``benchmarks/chaos.py --node-loss teacher``) in a
subprocess, so the session's own Ray cluster is left as it is."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_a_run_that_loses_a_teachers_node_completes_on_the_other_teacher():
    proc = subprocess.run([sys.executable, "benchmarks/chaos.py", "--node-loss", "teacher", "--steps", "16"],
                          cwd=ROOT, capture_output=True, text=True, timeout=480)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(report["removed"]) == 1 and "teacher-" in report["removed"][0]
    lost = report["removed"][0].split("(with ")[1].split(")")[0]
    assert report["outcome"] == "completed 16 steps", report
    assert report["lost_actors"] == [lost]
    assert report["prompts_lost"] == 0 and report["duplicates"] == 0
    assert report["summary_written"] and report["final_written"]
    assert f"{lost} was lost with its node" in proc.stderr
