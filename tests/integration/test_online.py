"""The online loop end to end on tiny models, on a real local Ray cluster with real DeepSpeed."""

import json

import pytest
import torch

from driver.config import load_config
from driver.online import run_online
from driver.prepare import prepare

HF = ["teacher.engine.backend=hf", "sampler.engine.backend=hf"]  # fast engines for tiny models
pytestmark = [pytest.mark.usefixtures("ray_cluster"), pytest.mark.slow]


def tiny_config(tiny_models, tmp_path, *overrides):
    return load_config(None, [
        f"models.teacher={tiny_models['teacher']}", f"models.student={tiny_models['student']}",
        f"models.cache_dir={tmp_path / 'cache'}", f"run.runs_dir={tmp_path}",
        "data.num_prompts=24", "teacher.max_new_tokens=8", "sampler.max_new_tokens=8",
        "teacher.top_k_logprobs=4", "sampler.prompts_per_request=4", "buffer.capacity=64",
        "buffer.min_size_to_train=4", "learner.batch_size=4", "learner.max_steps=6", "learner.lr=5e-3",
        "sync.every_steps=2", "ray.num_cpus=6", *HF, *overrides])


def test_online_dpkd_end_to_end(tiny_models, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = tiny_config(tiny_models, tmp_path)
    prep = prepare(cfg, str(tmp_path / "run"))
    summary = run_online(cfg, prep, progress=False)

    assert summary["steps"] == 6
    # weights reached the samplers: version up, and their greedy output changed to the final model's
    assert summary["policy_version"] == 3 and summary["sampler_versions"] == [3]
    probe = summary["probe"]
    assert probe["after"] != probe["before"]
    final = AutoModelForCausalLM.from_pretrained(summary["final_model"])
    tok = AutoTokenizer.from_pretrained(summary["final_model"])
    ids = torch.tensor([prep.requests[0]["prompt_ids"]])
    out = final.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    assert tok.decode(out[0, ids.shape[1]:], skip_special_tokens=False).startswith(probe["after"])

    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 7))
    for key in ("loss", "reward_margin", "chosen_logratio", "rejected_logratio", "buffer_size",
                "policy_lag", "samples_per_s", "step_time_s"):
        assert all(r[key] is not None for r in rows), key
    assert rows[0]["loss"] != rows[-1]["loss"]  # the loss moved
    assert all(r["policy_lag"] <= cfg.buffer.max_policy_lag for r in rows)
    assert (tmp_path / "run" / "config.yaml").is_file()
    assert summary["pairs_added"] >= 6 * 4


@pytest.mark.vllm
def test_online_loop_with_vllm_samplers_and_teachers(tiny_models, tmp_path):
    pytest.importorskip("vllm")
    cfg = tiny_config(tiny_models, tmp_path, "teacher.engine.backend=vllm", "sampler.engine.backend=vllm",
                      "learner.max_steps=4")
    prep = prepare(cfg, str(tmp_path / "run"))
    summary = run_online(cfg, prep, progress=False)
    assert summary["steps"] == 4
    assert summary["sampler_versions"] == [summary["policy_version"]] == [2]
    assert summary["probe"]["after"] != summary["probe"]["before"]  # vLLM reloaded the new weights
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["loss"] is not None and r["reward_margin"] is not None for r in rows)
