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


def test_a_run_stopped_in_an_offline_phase_shows_and_resumes_the_weights_it_trained(tiny_models, tmp_path):
    """Ctrl-C during an offline phase: the checkpoint's weights reach the samplers before the summary's
    probe (an offline phase pushes none of its own), and the resumed run goes on from them."""
    import os
    import signal
    import threading
    import time

    import torch
    from transformers import AutoModelForCausalLM

    run = tmp_path / "run"
    cfg = cfg_for(tiny_models, 8, "checkpoint.every_steps=0", "learner.lr=2e-2",
                  "schedule=[{kind: offline, steps: 6, loss: {type: sft}}, {kind: online, steps: 2, loss: {type: dpkd}}]")
    prep = prepare(cfg, str(run))

    def interrupt():  # Ctrl-C once two offline steps are logged
        log = run / "metrics.jsonl"
        deadline = time.time() + 240
        while time.time() < deadline and not (log.exists() and len(log.read_text().splitlines()) >= 2):
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=interrupt, daemon=True).start()
    stopped = run_online(cfg, prep, progress=False)
    assert stopped["interrupted_at"] and stopped["steps"] < 6
    ckpt = latest_checkpoint(run)
    assert json.loads((ckpt / "driver_state.json").read_text())["version"] == 1
    assert stopped["policy_version"] == 1 and stopped["sampler_versions"] == [1]
    model = AutoModelForCausalLM.from_pretrained(ckpt / "hf")
    ids = torch.tensor([prep.requests[0]["prompt_ids"]])
    out = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=prep.tokenizer.pad_token_id,
                         eos_token_id=prep.tokenizer.eos_token_id)
    assert prep.tokenizer.decode(out[0, ids.shape[1]:]).startswith(stopped["probe"]["after"])
    assert stopped["probe"]["after"] != stopped["probe"]["before"]

    done = run_online(cfg, prepare(cfg, str(run), resume=True), progress=False, resume=True)
    assert done["steps"] == 8 and done["interrupted_at"] is None
    assert done["sampler_versions"] == [done["policy_version"]]


def test_latest_checkpoint_ignores_a_half_written_one(tmp_path):
    (tmp_path / "checkpoints" / "step-000002").mkdir(parents=True)
    (tmp_path / "checkpoints" / ".tmp-step-000004").mkdir()
    assert latest_checkpoint(tmp_path).name == "step-000002"


# Ctrl-C, the printed resume command and a damaged checkpoint: tests/integration/test_run_lifecycle.py
