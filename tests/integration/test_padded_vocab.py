"""Engines never sample an embedding's padding rows: with a teacher padded past the tokenizer (Qwen2.5-7B
152064 rows vs -0.5B 151936, same tokenizer) sequence-level losses are allowed, and the student must be
able to embed every token the teacher writes."""

import importlib.util

import pytest

from actors.engines.base import SamplingParams
from kd.models import make_tiny_model, tiny_tokenizer

SAMPLE = SamplingParams(max_new_tokens=48, temperature=1.5, seed=0)


@pytest.fixture(scope="module")
def padded(tmp_path_factory):
    # random weights put ~23% of the probability on the 149 padding rows: 4 x 48 draws would hit them
    return str(make_tiny_model(tmp_path_factory.mktemp("m") / "padded", vocab_size=640))


def prompts():
    tok = tiny_tokenizer()
    return [tok.encode(q) for q in ("Tom has 3 apples.", "A baker makes 12 loaves.", "Sara reads", "0 1 2")]


def sampled_ids(engine) -> set[int]:
    return {t for g in engine.generate(prompts(), SAMPLE) for t in g.token_ids}


def test_hf_engine_samples_only_tokenizer_ids(padded):
    from actors.engines.hf_engine import HFEngine

    ids = sampled_ids(HFEngine(padded))
    assert ids and max(ids) < len(tiny_tokenizer())


@pytest.mark.vllm
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")
def test_vllm_engine_samples_only_tokenizer_ids(padded):
    from actors.engines.vllm_engine import VLLMEngine

    ids = sampled_ids(VLLMEngine(padded, max_logprobs=1, kv_cache_gb=0.25))
    assert ids and max(ids) < len(tiny_tokenizer())
