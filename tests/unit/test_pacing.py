"""The online producers' pacing (sampler.max_steps_ahead): they take a new prompt only while the rows
no learner has taken yet, plus the prompts in flight, are under max_steps_ahead x learner.batch_size.
Actors are stand-ins here (the pacing is the driver's arithmetic); test_online.py runs it on Ray."""

import pytest

from driver import producers
from driver.config import ConfigError, load_config
from driver.producers import OnlineProducer, PromptStream


class Ref:
    """An ObjectRef stand-in: what ``ray.get`` of it returns."""

    def __init__(self, value):
        self.value = value


class Remote:
    def __init__(self, fn):
        self.remote = fn


class Actors:
    def __init__(self):
        self.samplers = [type("Sampler", (), {"generate": Remote(lambda reqs, seed: Ref(None))})()]
        self.teachers = type("Pool", (), {"submit": lambda self, reqs, gen, **kw: Ref(len(reqs)),
                                          "done": lambda self, pair: 0})()
        # the buffer adds every row of a request: ray.get(add) is the row count
        self.buffer = type("Buffer", (), {"add": Remote(lambda pair, _, request_id: Ref(pair.value))})()


def producer(tmp_path, monkeypatch, ahead: int) -> OnlineProducer:
    monkeypatch.setattr(producers.ray, "get", lambda ref: ref.value)
    cfg = load_config(None, ["sampler.prompts_per_request=4", "sampler.max_in_flight=8", "learner.batch_size=8",
                             f"sampler.max_steps_ahead={ahead}"])
    requests = [{"prompt_id": f"p{i}", "prompt_ids": [1], "teacher_prompt_ids": [1]} for i in range(100)]
    return OnlineProducer(cfg, Actors(), PromptStream(requests, 0), tmp_path / "consumed.jsonl")


def in_flight(p: OnlineProducer) -> int:
    return sum(len(r["reqs"]) for r in p.in_flight.values())


def test_producers_stay_max_steps_ahead_of_the_learner(tmp_path, monkeypatch):
    p = producer(tmp_path, monkeypatch, ahead=2)  # 2 steps x 8 rows: 16 prompts
    p.top_up(0)
    assert in_flight(p) == 16 and len(p.pending()) == 4  # not max_in_flight's 8 requests
    for ref in p.pending()[:2]:  # two requests land: 8 untrained rows + 8 prompts in flight
        assert p.complete(ref) == {"default": 4}
    p.top_up(0)
    assert in_flight(p) == 8 and p.untrained == 8
    p.took(8)  # a learner step takes its batch: room for 8 more prompts
    p.top_up(0)
    assert in_flight(p) == 16 and p.untrained == 0
    p.held(5)  # the buffer's own count wins (e.g. rows it dropped as stale, or landed meanwhile)
    p.top_up(0)
    assert in_flight(p) == 16
    p.complete(p.pending()[0])
    p.took(8)
    p.top_up(0)  # 5 + 4 - 8 -> 1 untrained + 12 in flight: one more request of 4 fits under 16
    assert (p.untrained, in_flight(p)) == (1, 16)


def test_zero_lifts_the_bound(tmp_path, monkeypatch):
    p = producer(tmp_path, monkeypatch, ahead=0)
    p.top_up(0)
    assert len(p.pending()) == 8 and in_flight(p) == 32  # only max_in_flight bounds it


def test_a_bound_below_the_buffers_first_batch_is_refused():
    with pytest.raises(ConfigError, match=r"sampler.max_steps_ahead=1: x learner.batch_size \(4\) must reach "
                                          r"buffer.min_size_to_train \(8\)"):
        load_config(None, ["sampler.max_steps_ahead=1", "learner.batch_size=4", "buffer.min_size_to_train=8"])
    with pytest.raises(ConfigError, match=r"sampler.max_steps_ahead=-1: must be >= 0"):
        load_config(None, ["sampler.max_steps_ahead=-1"])
