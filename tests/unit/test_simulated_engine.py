"""The simulated engine (a measuring instrument, docs/scaling.md): shapes from the model config,
delays from the configured rates, weights accepted, never chosen by 'auto'."""

import json
import time

import pytest
import torch

from actors.engines import SamplingParams, make_engine, resolve_backend
from actors.engines.simulated import SimulatedEngine
from driver.config import ConfigError, load_config


@pytest.fixture
def model_dir(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 97, "model_type": "llama"}))
    return tmp_path


def test_generate_shapes_come_from_the_config_and_params(model_dir):
    eng = SimulatedEngine(model_dir, tokens_per_s=1e9, latency_s=0.0)
    gens = eng.generate([[1, 2], [3]], SamplingParams(max_new_tokens=40, top_k_logprobs=5))
    assert len(gens) == 2
    for g in gens:
        assert len(g.token_ids) == len(g.logprobs) == 40 and g.finish_reason == "length"
        assert all(0 <= t < 97 for t in g.token_ids)
        assert [len(row) for row in g.topk_ids] == [5] * 40 and [len(row) for row in g.topk_logprobs] == [5] * 40
        for tok, lp, ids, lps in zip(g.token_ids, g.logprobs, g.topk_ids, g.topk_logprobs):
            assert len(set(ids)) == 5 and all(0 <= i < 97 for i in ids)
            assert lps == sorted(lps, reverse=True) and all(x < 0 for x in lps)
            assert tok == ids[0] and lp == pytest.approx(lps[0])  # the sampled token is in its top-k
    plain = eng.generate([[1]], SamplingParams(max_new_tokens=3))[0]
    assert plain.topk_ids == [] and len(plain.token_ids) == 3


def test_score_shapes_follow_the_continuations(model_dir):
    eng = SimulatedEngine(model_dir, score_tokens_per_s=1e9, latency_s=0.0)
    scores = eng.score([[1], [2]], [[5, 6, 7], []], top_k=4)
    assert [len(s.logprobs) for s in scores] == [3, 0]
    assert [len(r) for r in scores[0].topk_ids] == [4, 4, 4]
    with pytest.raises(ValueError, match="2 prompts but 1 continuations"):
        eng.score([[1], [2]], [[5]], top_k=0)


def test_delays_follow_the_configured_rates(model_dir):
    eng = SimulatedEngine(model_dir, tokens_per_s=2000.0, score_tokens_per_s=4000.0, latency_s=0.05)
    t = time.perf_counter()
    eng.generate([[1]] * 4, SamplingParams(max_new_tokens=50))
    took = time.perf_counter() - t
    expected = 0.05 + 4 * 50 / 2000.0  # latency + tokens / rate = 0.15 s
    assert expected <= took < expected + 1.0
    t = time.perf_counter()
    eng.score([[1]] * 2, [[3] * 200] * 2)
    took = time.perf_counter() - t
    expected = 0.05 + 400 / 4000.0
    assert expected <= took < expected + 1.0


def test_update_weights_takes_a_real_state_dict(model_dir):
    eng = SimulatedEngine(model_dir, latency_s=0.0)
    state = torch.nn.Linear(3, 4).state_dict()  # 12 weights + 4 biases, float32
    eng.update_weights(state, 7)
    assert (eng.version, eng.weight_params, eng.weight_bytes, eng.weight_updates) == (7, 16, 64, 1)
    assert eng.generate([[1]], SamplingParams(max_new_tokens=2))[0].version == 7
    with pytest.raises(ValueError, match="non-empty state dict"):
        eng.update_weights({}, 8)


def test_vocab_needs_a_config_and_rates_must_be_positive(tmp_path, model_dir):
    with pytest.raises(ValueError, match="config.json not found"):
        SimulatedEngine(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="tokens_per_s=0"):
        SimulatedEngine(model_dir, tokens_per_s=0)


def test_make_engine_builds_it_only_when_named(model_dir):
    eng = make_engine("simulated", str(model_dir), seed=3, dtype="float32",
                      simulated={"tokens_per_s": 123.0, "latency_s": 0.5, "score_tokens_per_s": 456.0})
    assert isinstance(eng, SimulatedEngine)
    assert (eng.tokens_per_s, eng.latency_s, eng.score_tokens_per_s, eng.vocab_size) == (123.0, 0.5, 456.0, 97)
    assert resolve_backend("auto") in ("hf", "vllm")


def test_config_accepts_simulated_but_never_defaults_to_it():
    cfg = load_config(None, [])
    assert cfg.teacher.engine.backend == cfg.sampler.engine.backend == "auto"
    assert cfg.buffer.rows == "actor"
    cfg = load_config(None, ["teacher.engine.backend=simulated", "sampler.engine.simulated.tokens_per_s=500",
                             "buffer.rows=object_store"])
    assert cfg.teacher.engine.backend == "simulated" and cfg.sampler.engine.simulated.tokens_per_s == 500.0
    assert cfg.buffer.rows == "object_store"
    with pytest.raises(ConfigError, match=r"^teacher\.engine\.simulated\.tokens_per_s=0\.0: must be > 0$"):
        load_config(None, ["teacher.engine.simulated.tokens_per_s=0"])
    with pytest.raises(ConfigError, match=r"^sampler\.engine\.simulated\.latency_s=-1\.0: must be >= 0$"):
        load_config(None, ["sampler.engine.simulated.latency_s=-1"])
    with pytest.raises(ConfigError, match=r"^buffer\.rows='disk'"):
        load_config(None, ["buffer.rows=disk"])
    with pytest.raises(ConfigError, match=r"^teacher\.engine\.backend='simulate'"):
        load_config(None, ["teacher.engine.backend=simulate"])
