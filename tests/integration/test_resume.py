"""Checkpoints and --resume: an interrupted run continues to the same step count, no prompt twice."""

import json
from collections import Counter

import pytest

from driver.config import load_config
from driver.online import latest_checkpoint, run_online
from driver.prepare import prepare
from driver.runs import commit_resume, plan_resume

HF = ["teacher.engine.backend=hf", "sampler.engine.backend=hf"]  # fast engines for tiny models
pytestmark = [pytest.mark.usefixtures("ray_cluster"), pytest.mark.slow]


def cfg_for(tiny_models, steps, *extra):
    return load_config(None, [
        f"models.teacher={tiny_models['teacher']}", f"models.student={tiny_models['student']}",
        "data.num_prompts=40", "teacher.max_new_tokens=6", "sampler.max_new_tokens=6",
        "teacher.top_k_logprobs=2", "sampler.prompts_per_request=4", "buffer.capacity=64",
        "learner.batch_size=4", "learner.lr=5e-3", "sync.every_steps=2", "ray.num_cpus=6", *HF,
        f"learner.max_steps={steps}", "checkpoint.every_steps=2", "checkpoint.keep_last=2", *extra])


def test_resume_reaches_the_same_step_count_without_reusing_prompts(tiny_models, tmp_path):
    run = tmp_path / "run"
    first = run_online(cfg := cfg_for(tiny_models, 4), prepare(cfg, str(run)), progress=False)
    assert first["steps"] == 4
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["step-000002", "step-000004"]  # keep_last=2, no temporaries left
    ck = latest_checkpoint(run)
    assert {"learner", "buffer.parquet", "driver_state.json", "hf", "manifest.json"} <= {p.name for p in ck.iterdir()}

    # a longer schedule is a config change: allowed explicitly, recorded, then the run goes on
    plan = plan_resume(run, None, ["learner.max_steps=6"], allow_change=True)
    assert [c[0] for c in plan.changes] == ["learner.max_steps"]
    second = run_online(plan.cfg, prepare(plan.cfg, str(run), resume=True), progress=False,
                        resume=plan.checkpoint, on_resumed=lambda: commit_resume(plan))
    assert second["steps"] == 6
    assert second["sampler_versions"] == [second["policy_version"]] == [3]
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    consumed = Counter((line["epoch"], pid) for line in map(json.loads, (run / "consumed.jsonl").read_text().splitlines())
                       for pid in line["prompt_ids"])
    assert consumed and max(consumed.values()) == 1  # no prompt consumed twice within an epoch
    # nothing skipped either: an epoch that was finished covered every prompt once
    epochs = Counter(epoch for epoch, _ in consumed)
    assert all(n == 40 for e, n in epochs.items() if e < max(epochs))
    assert second["prompts_requested"] == sum(epochs.values())
    # one row per consumed prompt, all from the one teacher pool, counted across both sessions
    assert second["pairs_by_teacher"] == {"default": second["pairs_added"]} == {"default": sum(epochs.values())}


def test_latest_checkpoint_ignores_a_half_written_one(tmp_path):
    (tmp_path / "checkpoints" / "step-000002").mkdir(parents=True)
    (tmp_path / "checkpoints" / ".tmp-step-000004").mkdir()
    assert latest_checkpoint(tmp_path).name == "step-000002"


# Ctrl-C, the printed resume command and a damaged checkpoint: tests/integration/test_run_lifecycle.py
