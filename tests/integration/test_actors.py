"""Each actor on a real local Ray cluster, with tiny random models."""

import time

import pyarrow as pa
import pytest
import ray as ray_mod
import torch

from actors.engines.base import SamplingParams
from actors.engines.hf_engine import HFEngine
from kd.data import BUFFER_SCHEMA

pytestmark = pytest.mark.usefixtures("ray_cluster")

SAMPLING = {"max_new_tokens": 6, "temperature": 1.0, "top_p": 1.0}


def requests(n, start=0):
    return [{"prompt_id": f"p{start + i}", "prompt_ids": [1, 30 + i, 40, 50], "teacher_prompt_ids": [1, 30 + i, 40],
             "priming": "none", "reference_answer": str(i)} for i in range(n)]


def load_state(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).state_dict()


def test_sampler_generates_and_takes_new_weights(tiny_models):
    from actors.student_sampler import StudentSampler

    s = ray_mod.remote(StudentSampler).options(name="sampler-t0", num_cpus=1).remote(
        0, tiny_models["student"], "hf", {}, SAMPLING)
    reqs = requests(3)
    gens = ray_mod.get(s.generate.remote(reqs, seed=1))
    assert len(gens) == 3 and all(g.version == 0 and len(g.token_ids) == len(g.logprobs) > 0 for g in gens)
    before = ray_mod.get(s.generate.remote(reqs, greedy=True))

    assert ray_mod.get(s.update_weights.remote(load_state(tiny_models["student_b"]), 1)) == 1
    after = ray_mod.get(s.generate.remote(reqs, greedy=True))
    assert all(g.version == 1 for g in after)
    assert [g.token_ids for g in after] != [g.token_ids for g in before]
    ref = HFEngine(tiny_models["student_b"]).generate([r["prompt_ids"] for r in reqs],
                                                      SamplingParams(max_new_tokens=6, temperature=0.0))
    assert [g.token_ids for g in after] == [g.token_ids for g in ref]
    ray_mod.kill(s)


def test_teacher_pool_makes_pairs_and_balances_load(tiny_models):
    from actors.engines.base import Generation
    from actors.teacher_pool import TeacherPool

    pool = TeacherPool(2, {"num_cpus": 1}, model_path=tiny_models["teacher"], backend="hf", engine_opts={},
                       sampling=SAMPLING, top_k=4)
    ray_mod.get(pool.ready_refs())
    student = [Generation([5, 6, 7], [-1.0, -2.0, -3.0], "length", 3), Generation([8], [-0.5], "stop", 3)]
    refs = [pool.submit(requests(2, start=2 * i), ray_mod.put(student)) for i in range(4)]
    assert pool.in_flight == [2, 2]  # least-loaded dispatch alternates
    tables = ray_mod.get(refs)
    for r in refs:
        pool.done(r)
    assert pool.in_flight == [0, 0]
    t = tables[0]
    assert t.schema.equals(BUFFER_SCHEMA) and t.num_rows == 2
    row = t.to_pylist()[0]
    assert row["rejected_ids"] == [5, 6, 7] and row["policy_version"] == 3
    assert len(row["chosen_teacher_logps"]) == len(row["chosen_ids"]) > 0
    assert len(row["rejected_teacher_logps"]) == 3 and len(row["rejected_topk_ids"][0]) == 4
    assert row["rejected_behaviour_logps"] == [-1.0, -2.0, -3.0]
    # the teacher's scores of y_s are its own log-probs, checked against a direct forward
    hf = HFEngine(tiny_models["teacher"]).score([[1, 30, 40]], [[5, 6, 7]], top_k=4)[0]
    assert row["rejected_teacher_logps"] == pytest.approx(hf.logprobs, abs=1e-4)
    assert sorted(s["pairs"] for s in pool.stats()) == [4, 4]
    for w in pool.workers:
        ray_mod.kill(w)


def _rows(n, version=0):
    return pa.Table.from_pydict({
        "prompt_id": [str(i) for i in range(n)], "prompt_ids": [[1, 2]] * n, "teacher_prompt_ids": [[1]] * n,
        "chosen_ids": [[3, 4]] * n, "rejected_ids": [[5]] * n, "chosen_teacher_logps": [[-1.0, -1.0]] * n,
        "rejected_teacher_logps": [[-2.0]] * n, "chosen_topk_ids": [None] * n, "chosen_topk_logps": [None] * n,
        "rejected_topk_ids": [None] * n, "rejected_topk_logps": [None] * n,
        "rejected_behaviour_logps": [[-1.0]] * n, "policy_version": [version] * n, "priming": ["none"] * n,
        "created_at": [0.0] * n, "reference_answer": [None] * n, "teacher_name": [None] * n,
        "chosen_teacher_logp_sum": [None] * n, "rejected_teacher_logp_sum": [None] * n}, schema=BUFFER_SCHEMA)


def test_buffer_actor_backpressure_and_waiting_sample():
    from actors.replay_buffer import ReplayBuffer

    buf = ray_mod.remote(ReplayBuffer).options(max_concurrency=16).remote(4, 1)
    assert ray_mod.get(buf.add.remote(_rows(4))) == 4
    blocked = buf.add.remote(_rows(2))
    ready, _ = ray_mod.wait([blocked], timeout=1.0)
    assert not ready  # full of unconsumed rows: the producer waits, nothing is dropped
    assert ray_mod.get(buf.sample.remote(2, 0)).num_rows == 2
    assert ray_mod.get(blocked, timeout=10) == 2
    waiting = buf.sample.remote(8, 0, timeout=0.5)
    assert ray_mod.get(waiting) is None  # not enough rows in time
    stats = ray_mod.get(buf.stats.remote())
    assert stats["inserted"] == 6 and stats["consumed"] == 2 and stats["size"] == 4
    ray_mod.kill(buf)


def test_learner_trains_and_exports_weights(tiny_models):
    from actors.learner_group import LearnerGroup
    from driver.config import LearnerConfig, LossConfig

    group = LearnerGroup(1, {"num_cpus": 1}, tiny_models["student"],
                         LearnerConfig(batch_size=4, lr=1e-2), LossConfig(type="dpkd"))
    ray_mod.get(group.ready_refs())
    w0 = ray_mod.get(group.weights_ref())
    t = time.perf_counter()
    m = ray_mod.get(group.train_step(ray_mod.put(_rows(4))))
    assert torch.isfinite(torch.tensor(m["loss"])) and m["train_step_s"] < time.perf_counter() - t + 1
    assert {"reward_margin", "chosen_logratio", "rejected_logratio", "sft_loss", "grad_norm"} <= set(m)
    w1 = ray_mod.get(group.weights_ref())
    assert set(w0) == set(w1)
    assert any(not torch.equal(w0[k], w1[k]) for k in w0)
    group.shutdown()


def test_buffer_overflow_mode_lets_blocked_producers_finish():
    from actors.replay_buffer import ReplayBuffer

    buf = ray_mod.remote(ReplayBuffer).options(max_concurrency=16).remote(4, 1)
    ray_mod.get(buf.add.remote(_rows(4)))
    blocked = buf.add.remote(_rows(3))
    assert not ray_mod.wait([blocked], timeout=0.5)[0]
    ray_mod.get(buf.set_overflow.remote(True))  # the driver drains with no learner consuming
    assert ray_mod.get(blocked, timeout=10) == 3
    assert ray_mod.get(buf.stats.remote())["size"] == 7
    ray_mod.kill(buf)
