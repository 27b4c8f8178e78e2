"""benchmarks/scale.py --quick: a real multi-node local Ray cluster (ray.cluster_utils.Cluster) with
simulated teachers/samplers, the real driver, buffer, sync and a DeepSpeed learner, both buffer modes;
no prompt lost or doubled, and the reported ideal is the configured rates' own arithmetic."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # a 3-node cluster and two short runs: 195 s here, on 2 cores under a load of 40-50
def test_scale_benchmark_quick(tmp_path):
    out = tmp_path / "scale.json"
    # its own process: the benchmark starts its own cluster (this session may already have one)
    proc = subprocess.run([sys.executable, "benchmarks/scale.py", "--quick", "--json", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    a = data["args"]
    results = data["results"]
    assert [(r["variant"], r["replicas"], r["learners"]) for r in results] == [("before", 2, 1), ("after", 2, 1)]
    L, P, lat = a["response_tokens"], a["prompts_per_request"], a["latency"]
    sampler_s = lat + P * L / a["tokens_per_s"]
    teacher_s = 2 * lat + P * L / a["tokens_per_s"] + P * L / a["score_tokens_per_s"]
    for r in results:
        assert r["prompts"]["ok"], r["prompts"]["problems"]
        assert r["prompts"]["doubled"] == 0 and r["prompts"]["consumed"] == r["pairs"] > 0
        assert r["steps"] == a["steps"]
        assert abs(r["ideal_pairs_s"] - 2 * P / max(sampler_s, teacher_s)) < 1e-9
        assert r["measured_pairs_s"] > 0 and r["efficiency"] == r["measured_pairs_s"] / r["ideal_pairs_s"]
    before, after = results
    assert before["buffer_rows"] == "actor" and after["buffer_rows"] == "object_store"  # the actor's own report
    assert "SIMULATED" in proc.stdout and "ok" in proc.stdout
