"""The learner group on a local Ray cluster (CPU, gloo): data-parallel equivalence, gradient
accumulation, ZeRO-3, checkpoints and resume, LoRA, and both weight-sync transports."""

import math
import random
import time

import pyarrow as pa
import pyarrow.compute as pc
import pytest
import ray
import torch

from actors.learner import deepspeed_config, resolve_bf16, split_rows
from driver.config import LearnerConfig, LoraConfig, LossConfig
from kd.data import BUFFER_SCHEMA

pytestmark = pytest.mark.usefixtures("ray_cluster")

VOCAB = 40  # ids well inside every tiny model's vocabulary


def batch(n: int, seed: int, teachers: list | None = None) -> pa.Table:
    """``n`` buffer rows with varied prompt/response lengths (so how rows are split matters), made by
    the teacher pools ``teachers`` (one name per row; default none)."""
    rng = random.Random(seed)

    def ids(lo, hi):
        return [rng.randrange(3, VOCAB) for _ in range(rng.randint(lo, hi))]

    rows = []
    top = random.Random(seed + 1000)  # the teacher's top-k (3 distinct ids), for the health metrics

    def topk(resp):
        return ([top.sample(range(3, VOCAB), 3) for _ in resp],
                [sorted((-top.uniform(0.1, 4) for _ in range(3)), reverse=True) for _ in resp])

    for i in range(n):
        c, r = ids(1, 6), ids(1, 5)
        (c_ids, c_lps), (r_ids, r_lps) = topk(c), topk(r)
        rows.append({"prompt_id": f"s{seed}-{i}", "prompt_ids": ids(2, 7), "teacher_prompt_ids": ids(2, 5),
                     "chosen_ids": c, "rejected_ids": r,
                     "chosen_teacher_logps": [-rng.uniform(0.1, 3) for _ in c],
                     "rejected_teacher_logps": [-rng.uniform(1, 5) for _ in r],
                     "chosen_topk_ids": c_ids, "chosen_topk_logps": c_lps, "rejected_topk_ids": r_ids,
                     "rejected_topk_logps": r_lps, "rejected_behaviour_logps": [-1.0] * len(r),
                     "policy_version": 0, "priming": "none", "created_at": 0.0, "reference_answer": None,
                     "teacher_name": teachers[i] if teachers else None})
    return pa.Table.from_pylist(rows, schema=BUFFER_SCHEMA)


def make_group(prefix, model, k=1, **cfg):
    from actors.learner_group import LearnerGroup

    cfg = {"batch_size": 4, "lr": 1e-3, "num_learners": k, **cfg}
    return LearnerGroup(k, {"num_cpus": 1}, model, LearnerConfig(**cfg), LossConfig(type="dpkd"),
                        seed=0, name_prefix=prefix, max_new_tokens={"chosen": 5, "rejected": 4})


def train(group, batches):
    return [ray.get(group.train_step(ray.put(b))) for b in batches]


def max_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max((a[k] - b[k]).abs().max().item() for k in a)


def assert_same_update(a: dict, b: dict, lr: float = 1e-3) -> None:
    """Equal up to float rounding. Summing per-row gradients in another order changes them by ~1e-7
    relative; where a gradient is a near-cancelling sum (|g| ~ Adam's eps 1e-8), Adam's g/(|g|+eps)
    turns that into up to ~1% of lr. So: max 1% of lr, and almost every element within 1e-7."""
    d = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    assert set(a) == set(b)
    assert d.max().item() < 1e-2 * lr, d.max().item()
    assert (d > 1e-7).float().mean().item() < 1e-3 and d.mean().item() < 1e-9


# -- pure pieces ------------------------------------------------------------------------------------


def test_split_rows_covers_the_batch_once():
    parts = [split_rows(10, r, 2, 3) for r in range(2)]
    assert sorted(i for p in parts for m in p for i in m) == list(range(10))
    assert parts[0] == [[0], [2, 4], [6, 8]] and parts[1] == [[1], [3, 5], [7, 9]]
    assert split_rows(1, 1, 2, 2) == [[], []]  # a rank with no rows still runs (weight-0) passes


def test_deepspeed_config_from_learner_config_and_json(tmp_path):
    cfg = deepspeed_config(LearnerConfig(batch_size=8, grad_accum_steps=2, zero_stage=2), 2, False)
    assert cfg["train_micro_batch_size_per_gpu"] == 2 and cfg["gradient_accumulation_steps"] == 2
    assert cfg["zero_optimization"] == {"stage": 2} and "bf16" not in cfg
    js = tmp_path / "ds.json"
    js.write_text('{"zero_optimization": {"stage": 3}, "gradient_accumulation_steps": "auto", '
                  '"train_batch_size": "auto"}')
    cfg = deepspeed_config(LearnerConfig(batch_size=8, deepspeed_config=str(js)), 2, True)
    assert cfg["zero_optimization"] == {"stage": 3}  # the JSON wins
    assert cfg["gradient_accumulation_steps"] == 1 and "train_batch_size" not in cfg  # "auto" filled
    assert cfg["bf16"] == {"enabled": True}


def test_bf16_on_without_a_gpu_fails_clearly(tiny_models):
    from actors.learner_group import LearnerGroup
    from kd.errors import UserInputError

    assert resolve_bf16("off") is False and resolve_bf16("auto") is torch.cuda.is_available()
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="bf16='on'"):
            resolve_bf16("on")
    with pytest.raises(UserInputError, match=r"learner.bf16='on' needs learners with GPUs"):
        LearnerGroup(1, {"num_cpus": 1}, tiny_models["student"], LearnerConfig(bf16="on"), LossConfig())


# -- data parallelism and accumulation ------------------------------------------------------------


@pytest.mark.slow
def test_two_ranks_and_accumulation_take_the_same_step_as_one(tiny_models):
    """K=2 (ZeRO-0), and K=1 with 2 micro-batches, train two steps on the same batches from the same
    weights as K=1 in one go: the weights agree to float rounding, after the updates moved them ~1000x
    farther."""
    model = tiny_models["student"]
    groups = {"one": make_group("dp1", model), "two": make_group("dp2", model, k=2),
              "accum": make_group("ga2", model, grad_accum_steps=2)}
    ray.get([r for g in groups.values() for r in g.ready_refs()])
    w0 = ray.get(groups["one"].weights_ref())
    pools = ["x", "y", "x", "x"]  # the 2nd batch mixes two teacher pools: rank 0 gets x, x; rank 1 y, x
    batches = [batch(4, 1, ["x"] * 4), batch(4, 2, pools)]
    metrics = {name: train(g, batches) for name, g in groups.items()}
    w = {name: ray.get(g.weights_ref()) for name, g in groups.items()}
    moved = max_diff(w["one"], w0)
    assert moved > 1e-3
    assert_same_update(w["two"], w["one"])
    assert_same_update(w["accum"], w["one"])
    for name in ("two", "accum"):  # the step's metrics are those of the whole batch
        for a, b in zip(metrics[name], metrics["one"]):
            for key in ("loss", "sft_loss", "dpkd_loss", "reward_margin", "grad_norm", "student_entropy",
                        "top1_agreement", "topk_overlap", "teacher_topk_mass", "y_t_len", "y_s_len",
                        "y_t_truncated", "y_s_truncated"):
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (name, key)
            assert set(a) == set(b), name
            for key in (k for k in b if "/" in k):  # per teacher pool: summed over ranks, not averaged
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (name, key)
    assert not any("/" in k for k in metrics["one"][0])  # one pool: no per-pool keys
    mixed = metrics["one"][1]
    assert {k for k in mixed if "/" in k} >= {f"{m}/{p}" for p in "xy" for m in (
        "rows", "reward_margin", "reward_accuracy", "chosen_reward", "rejected_reward", "sft_loss", "y_t_len",
        "y_s_len")}
    assert (mixed["rows/x"], mixed["rows/y"]) == (3, 1)
    for p in "xy":
        rows = batches[1].filter(pc.equal(batches[1].column("teacher_name"), p))
        c = rows.column("chosen_ids").to_pylist()
        assert mixed[f"y_t_len/{p}"] == pytest.approx(sum(map(len, c)) / len(c))
    # the batch's mean is the pools' means weighted by their rows
    for key in ("reward_margin", "chosen_reward", "y_s_len"):
        assert mixed[key] == pytest.approx((3 * mixed[f"{key}/x"] + mixed[f"{key}/y"]) / 4, rel=1e-5)
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(model).vocab_size
    for b, m in zip(batches, metrics["one"]):  # the row metrics, from the batch directly
        c, r = b.column("chosen_ids").to_pylist(), b.column("rejected_ids").to_pylist()
        assert m["y_t_len"] == pytest.approx(sum(map(len, c)) / len(c))
        assert m["y_s_len"] == pytest.approx(sum(map(len, r)) / len(r))
        assert m["y_t_truncated"] == pytest.approx(sum(len(x) >= 5 for x in c) / len(c))  # no EOS in ids
        assert m["y_s_truncated"] == pytest.approx(sum(len(x) >= 4 for x in r) / len(r))
        assert 0 <= m["top1_agreement"] <= 1 and 0 <= m["topk_overlap"] <= 1
        assert 0 < m["student_entropy"] <= math.log(vocab) + 1e-4  # at most the uniform's
    info = groups["accum"].info()[0]
    assert info["grad_accum_steps"] == 2 and info["steps"] == 2
    for g in groups.values():
        g.shutdown()


def test_set_lr_changes_the_rate_of_the_next_step_and_keeps_the_warmup(tiny_models):
    """A phase's own rate: Adam's first update moves every weight with a gradient by about lr (m/sqrt(v)
    is +-1 on the first step), so after ``set_lr`` the largest change is the new rate times the
    warm-up factor of that step (here 1/2), not learner.lr's."""
    group = make_group("lr", tiny_models["student"], warmup_steps=2)
    ray.get(group.ready_refs())
    w0 = ray.get(group.weights_ref())
    assert group.set_lr(4e-3) == [pytest.approx(4e-3 / 2)]  # step 1 of a 2-step warm-up
    [m1] = train(group, [batch(4, 1)])
    w1 = ray.get(group.weights_ref())
    assert m1["lr"] == pytest.approx(2e-3)
    assert max_diff(w1, w0) == pytest.approx(2e-3, rel=0.02)
    [m2] = train(group, [batch(4, 2)])  # warm-up over: the new peak, not learner.lr (1e-3)
    assert m2["lr"] == pytest.approx(4e-3)
    group.shutdown()


@pytest.mark.slow
def test_zero3_two_ranks_matches_one_and_syncs_both_ways(tiny_models, tmp_path):
    """ZeRO-3 with K=2 takes the K=1 step (the same tolerance as above); its gathered weights reach
    samplers through the object store and through the bucketed broadcast (gloo here; NCCL on GPU),
    resend_to restores a reset sampler, and save_hf exports them."""
    from actors.student_sampler import StudentSampler
    from actors.weight_sync import WeightSync
    from transformers import AutoModelForCausalLM

    model = tiny_models["student"]
    # against K=1 under ZeRO-3 too: ZeRO-3's own reduction order differs from ZeRO-0's by rounding
    one, z3 = make_group("z1", model, zero_stage=3), make_group("z3", model, k=2, zero_stage=3)
    sampler_cls = ray.remote(StudentSampler)
    samplers = [sampler_cls.options(name=f"z3-sampler-{i}", num_cpus=0.5).remote(
        i, tiny_models["student_b"], "hf", {}, {"max_new_tokens": 4}) for i in range(2)]
    ray.get(one.ready_refs() + z3.ready_refs() + [s.ready.remote() for s in samplers])
    assert {i["total_params"] for i in one.info() + z3.info()} == {one.info()[0]["total_params"]}
    train(one, [batch(4, 3)])
    train(z3, [batch(4, 3)])
    w_one, w_z3 = ray.get(one.weights_ref()), ray.get(z3.weights_ref())
    assert_same_update(w_z3, w_one)

    def sampler_state(s):
        return ray.get(s.__ray_call__.remote(lambda self: self.engine.model.state_dict()))

    sync = WeightSync(z3, samplers)  # object store
    ray.get([s.ready.remote() for s in samplers])
    samplers[0].__ray_call__.remote(lambda self: time.sleep(2.0))  # as a generation ahead in its queue
    t0 = time.perf_counter()
    sync.push(1)
    seconds = sync.wait()
    # what the sync itself cost (fetch + load), not the 2 s the push waited behind the sampler's queue
    assert time.perf_counter() - t0 >= 2.0 > seconds > 0
    for s in samplers:
        assert max_diff({k: v for k, v in sampler_state(s).items() if k in w_z3}, w_z3) == 0.0
    # a sampler restarted by Ray is back on its initial weights: resend_to gives it the last push
    ray.get(samplers[0].update_weights.remote(ray.get(z3.weights_ref()) | {
        "model.norm.weight": torch.zeros_like(w_z3["model.norm.weight"])}, 99))
    sync.resend_to(0)
    sync.wait()
    assert ray.get(samplers[0].version.remote()) == 1
    assert max_diff({k: v for k, v in sampler_state(samplers[0]).items() if k in w_z3}, w_z3) == 0.0
    train(z3, [batch(4, 4)])
    w2 = ray.get(z3.weights_ref())
    bsync = WeightSync(z3, samplers, mode="broadcast", bucket_mb=0.05, backend="gloo")  # many buckets
    bsync.push(2)
    bsync.wait()
    assert ray.get([s.version.remote() for s in samplers]) == [2, 2]
    for s in samplers:
        assert max_diff({k: v for k, v in sampler_state(s).items() if k in w2}, w2) == 0.0
    bsync.resend_to(1)  # under broadcast: through the object store, and the group is rebuilt...
    bsync.push(3)  # ...for the next push
    bsync.wait()
    assert ray.get([s.version.remote() for s in samplers]) == [3, 3]
    for s in samplers:
        assert max_diff({k: v for k, v in sampler_state(s).items() if k in w2}, w2) == 0.0
    out = z3.save_hf(str(tmp_path / "hf"), model)
    saved = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).state_dict()
    assert max_diff({k: saved[k] for k in w2}, w2) == 0.0
    for s in samplers:
        ray.kill(s)
    one.shutdown()
    z3.shutdown()


# -- checkpoints --------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("k,stage", [(1, 0), (2, 2)])
def test_resume_from_checkpoint_gives_the_same_weights(tiny_models, tmp_path, k, stage):
    """Train 2 steps, save, train 2 more -> W1; a fresh group loads and trains the same 2 -> W1 again
    (optimizer moments, LR warm-up position, step counter and RNG all restored)."""
    model = tiny_models["student"]
    kw = {"k": k, "zero_stage": stage, "warmup_steps": 6}
    first, second = make_group(f"ck{k}a", model, **kw), make_group(f"ck{k}b", model, **kw)
    ray.get(first.ready_refs() + second.ready_refs())
    batches = [batch(4, s) for s in range(10, 14)]
    train(first, batches[:2])
    first.save_checkpoint(str(tmp_path / "ckpt"))
    m1 = train(first, batches[2:])
    w1 = ray.get(first.weights_ref())
    assert second.load_checkpoint(str(tmp_path / "ckpt")) == 2
    m2 = train(second, batches[2:])
    w2 = ray.get(second.weights_ref())
    assert max_diff(w1, w2) == 0.0  # bitwise (same ops, same order, same thread count)
    assert [m["lr"] for m in m1] == [m["lr"] for m in m2] == pytest.approx([3e-3 / 6, 4e-3 / 6])  # steps 3, 4 of a 6-step warm-up
    assert [m["loss"] for m in m1] == pytest.approx([m["loss"] for m in m2], abs=1e-6)
    assert {i["steps"] for i in second.info()} == {4}
    first.shutdown()
    second.shutdown()


# -- LoRA ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_lora_trains_adapters_only_and_exports_merged_weights(tiny_models, tmp_path):
    """Only the adapters train; samplers get W + scale * B @ A under the base names (also with
    ZeRO-3 over 2 ranks), without disturbing the adapter; save_hf writes the merged model."""
    from transformers import AutoModelForCausalLM

    from actors.engines.base import SamplingParams
    from actors.engines.hf_engine import HFEngine

    model = tiny_models["student"]
    lora = LoraConfig(r=4, alpha=8.0, target_modules=["q_proj", "v_proj"])
    group = make_group("lora", model, lora=lora, lr=1e-2)
    z3 = make_group("lora-z3", model, k=2, zero_stage=3, lora=lora, lr=1e-2)
    ray.get(group.ready_refs() + z3.ready_refs())
    info = group.info()[0]
    assert info["lora"] and 0 < info["trainable_params"] < info["total_params"] // 5
    assert [i["trainable_params"] for i in z3.info()] == [info["trainable_params"]] * 2

    def adapters():
        return ray.get(group.learners[0].__ray_call__.remote(lambda self: {
            n: p.detach().clone() for n, p in self.engine.module.named_parameters() if p.requires_grad}))

    base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).state_dict()
    a0 = adapters()
    assert a0 and all("lora_" in n for n in a0)
    train(group, [batch(4, 20), batch(4, 21)])
    train(z3, [batch(4, 20), batch(4, 21)])
    a1 = adapters()
    assert any(not torch.equal(a0[n], a1[n]) for n in a0)
    merged = ray.get(group.weights_ref())
    assert set(merged) == set(base)  # the base model's names: no 'base_layer', no 'lora_'
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    assert changed and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in changed)
    assert ray.get(group.weights_ref()).keys() == merged.keys()  # merging left the adapter alone
    assert max_diff(ray.get(group.weights_ref()), merged) == 0.0
    assert adapters().keys() == a1.keys() and max_diff(adapters(), a1) == 0.0
    assert_same_update(ray.get(z3.weights_ref()), merged, lr=1e-2)  # LoRA under ZeRO-3, 2 ranks

    engine = HFEngine(tiny_models["student_b"])
    engine.update_weights(merged, 1)
    prompts = [[1, 5, 6, 7]]
    got = engine.generate(prompts, SamplingParams(max_new_tokens=5, temperature=0.0))
    out = group.save_hf(str(tmp_path / "lora-hf"), model)
    ref = HFEngine(out).generate(prompts, SamplingParams(max_new_tokens=5, temperature=0.0))
    assert got[0].token_ids == ref[0].token_ids and got[0].logprobs == pytest.approx(ref[0].logprobs, abs=1e-5)
    saved = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).state_dict()
    assert max_diff({k: saved[k] for k in merged}, merged) == 0.0
    z3_out = z3.save_hf(str(tmp_path / "lora-z3-hf"), model)
    saved = AutoModelForCausalLM.from_pretrained(z3_out, dtype=torch.float32).state_dict()
    assert_same_update({k: saved[k] for k in merged}, merged, lr=1e-2)
    group.shutdown()
    z3.shutdown()
