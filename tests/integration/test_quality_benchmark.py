"""benchmarks/quality.py at a tiny size: every method of the chosen subset trains, is scored on
held-out prompts, and lands in the report (table, plot, raw JSON)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def test_quality_benchmark_runs_the_grid_at_a_tiny_size(tmp_path):
    out = tmp_path / "results.md"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "quality.py"), "--tiny", "--quick", "--steps", "2",
           "--methods", "initial,seqkd,gkd_jsd,dpkd", "--work", str(tmp_path / "work"), "--out", str(out),
           "--eval-backend", "hf"]  # the vLLM scorer has its own test below (an engine start saved here)
    env = dict(os.environ, RAY_ADDRESS="")  # its own local cluster
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    raw = json.loads(out.with_suffix(".json").read_text())
    runs = {r["method"]: r for r in raw["runs"]}
    assert set(runs) == {"initial", "seqkd", "gkd_jsd", "dpkd"}
    for name, r in runs.items():
        assert 0 <= r["synth_rouge_l"] <= 1 and r["kl_teacher_student"] > 0 and r["kl_student_teacher"] > 0
        assert (r["steps"], r["wall_s"] > 0) == ((0, False) if name == "initial" else (2, True))
        assert r["run_s"] >= 0 and r["score_s"] > 0  # where the grid's time goes: each run's own clock
        if name != "initial":
            assert r["run_s"] > r["loop_s"] > 0  # the run's clock holds its loop and the actors' start
            # wall s charges the shared teacher dataset to the methods that read it (SeqKD offline, DPKD its
            # y_t through teacher_answers), loop s does not
            assert (r["wall_s"] > r["loop_s"]) == (name in ("seqkd", "dpkd"))
    # the teacher work each loss needs: GKD's jsd only scores the student's samples; DPKD's y_t are the
    # dataset's answers, so its teacher generated exactly the dataset's tokens and scored y_s online
    assert runs["gkd_jsd"]["teacher_generated_tokens"] == 0 < runs["gkd_jsd"]["teacher_tokens"]
    assert runs["dpkd"]["teacher_generated_tokens"] == runs["seqkd"]["teacher_generated_tokens"] > 0
    assert runs["dpkd"]["teacher_tokens"] > runs["dpkd"]["teacher_generated_tokens"]
    assert runs["seqkd"]["teacher_tokens"] > 0  # the shared teacher dataset is charged to it
    table = out.read_text()
    assert all(f"| {m} | 1 |" in table for m in runs) and "| teacher (reference) |" in table
    assert "Time of the 4 runs that recorded it (1 seed(s))" in table
    assert out.with_suffix(".png").stat().st_size > 1000
    # a scored run keeps its final model and metrics, not its resume checkpoints (they filled a disk)
    run = tmp_path / "work" / "dpkd-s0"
    assert (run / "final").is_dir() and (run / "metrics.jsonl").is_file() and not (run / "checkpoints").exists()
    # a re-run with the same work directory redoes nothing
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and json.loads(out.with_suffix(".json").read_text())["runs"] == raw["runs"]


def test_scorer_vllm_engine_with_swapped_weights_answers_as_a_fresh_hf_engine(tmp_path):
    """The grid scores every student with one vLLM engine, loading each student's weights into it in
    place. A student scored after another must get the greedy answers a fresh HF engine of that
    student gives (HF is the reference; greedy answers of the two engines match token for token)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import quality
    from driver.config import load_config
    from driver.prepare import prepare
    from kd.models import make_tiny_model

    paths = {k: str(make_tiny_model(tmp_path / k, layers, seed))
             for k, layers, seed in (("teacher", 4, 0), ("a", 2, 1), ("b", 2, 2))}
    base = quality.base_config({"teacher": paths["teacher"], "student": paths["a"]})
    cfg = load_config(quality._write_yaml(tmp_path / "c.yaml", base))
    prep = prepare(cfg, str(tmp_path / "run"))
    scorers = {b: quality.Scorer(cfg, prep.tokenizer, prep.teacher_path, None, 0, 6, backend=b)
               for b in ("vllm", "hf")}
    answers = {}
    for backend, scorer in scorers.items():
        for k in ("a", "b"):  # on vLLM: b's weights go into a's engine
            scorer.score(paths[k], 12, kl=False)
            answers[backend, k] = scorer.answers["synth"]
    assert scorers["vllm"].engine.version == 1  # one engine, updated in place, not rebuilt
    assert answers["vllm", "a"] != answers["vllm", "b"]  # the two students answer differently
    assert answers["vllm", "a"] == answers["hf", "a"] and answers["vllm", "b"] == answers["hf", "b"]
