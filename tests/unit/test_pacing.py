"""The online producers' pacing (sampler.max_steps_ahead): they take a new prompt only while the rows
no learner has taken yet, plus the prompts in flight, are under max_steps_ahead x learner.batch_size.
Actors are stand-ins here (the pacing is the driver's arithmetic); test_online.py runs it on Ray."""

import pytest

from driver import producers
from driver.config import ConfigError, load_config
from driver.producers import OnlineProducer, Pace, PromptStream


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


def producer(tmp_path, monkeypatch, ahead, actors=None, answers=None) -> OnlineProducer:
    monkeypatch.setattr(producers.ray, "get", lambda ref: ref.value)
    cfg = load_config(None, ["sampler.prompts_per_request=4", "sampler.max_in_flight=8", "learner.batch_size=8",
                             f"sampler.max_steps_ahead={ahead}"])
    requests = [{"prompt_id": f"p{i}", "prompt_ids": [1], "teacher_prompt_ids": [1]} for i in range(100)]
    return OnlineProducer(cfg, actors or Actors(), PromptStream(requests, 0), tmp_path / "consumed.jsonl",
                          answers=answers)


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
    with pytest.raises(ConfigError, match=r"sampler.max_steps_ahead=-1: must be >= 0 .* or 'auto'"):
        load_config(None, ["sampler.max_steps_ahead=-1"])


def pace(*overrides: str) -> Pace:
    return Pace(load_config(None, ["learner.batch_size=8", "buffer.min_size_to_train=8", *overrides]))


def test_auto_covers_a_requests_latency_with_learner_steps():
    # Little's law by hand: a request answered in L s while the learner takes a batch every S s needs
    # L / S steps of rows in flight plus the batch being trained: 1 + ceil(L / S)
    p = pace("sampler.max_steps_ahead=auto", "buffer.max_policy_lag=3", "sync.every_steps=2")  # at most 6
    assert p.steps == 2  # nothing measured yet
    p.answered(7.0)
    assert p.steps == 2  # no learner step yet
    p.stepped(3.0)
    assert p.steps == 4  # 1 + ceil(7 / 3)
    for latency in (20.0, 21.0):  # median of 7, 20, 21 is 20: 1 + ceil(20 / 3) = 8, above 3 x 2
        p.answered(latency)
    assert p.steps == 6
    for step in (30.0, 30.0):  # median step 30 s: the producers are quicker, the floor of 2 holds
        p.stepped(step)
    assert p.steps == 2
    p.stepped(None)  # a step without a time (a stand-in learner) changes nothing
    assert p.steps == 2


def test_auto_leaves_room_for_the_buffers_first_batch_and_a_number_stays_as_set():
    p = pace("sampler.max_steps_ahead=auto", "learner.batch_size=2", "buffer.min_size_to_train=7")
    assert p.steps == 4  # ceil(7 / 2) steps of rows before the first batch can be taken
    fixed = pace("sampler.max_steps_ahead=3")
    fixed.answered(100.0)
    fixed.stepped(1.0)
    assert fixed.steps == 3


def test_the_producer_bound_follows_the_measured_pace(tmp_path, monkeypatch):
    p = producer(tmp_path, monkeypatch, "auto")
    now = [0.0]
    p.clock = lambda: now[0]
    p.top_up(0)
    assert in_flight(p) == 16  # 2 steps x 8 rows before anything is measured
    p.stepped(4.0)
    now[0] = 12.0
    p.complete(p.pending()[0])  # latency 12 s, step 4 s: 1 + 3 = 4 steps (the default cap is 2 x 2)
    assert p.ahead == 32
    p.top_up(0)  # 4 untrained + 12 in flight under 32: four more requests of 4
    assert in_flight(p) == 28


def test_a_stored_teacher_answer_goes_to_the_teacher_not_the_sampler(tmp_path, monkeypatch):
    actors = Actors()
    seen = {"sampler": [], "teacher": []}
    actors.samplers[0].generate = Remote(lambda reqs, seed: seen["sampler"].extend(reqs) or Ref(None))
    actors.teachers.submit = lambda reqs, gen, **kw: seen["teacher"].extend(reqs) or Ref(len(reqs))
    stored = {f"p{i}": ([1], {"token_ids": [i], "logprobs": [-0.5]}) for i in range(0, 100, 2)}  # even ids
    p = producer(tmp_path, monkeypatch, 2, actors, answers=stored)
    p.top_up(0)
    sent = [r["prompt_id"] for r in seen["teacher"]]
    assert len(sent) == 16 and [r["prompt_id"] for r in seen["sampler"]] == sent
    assert all("teacher_answer" not in r for r in seen["sampler"])
    assert {r["prompt_id"]: r.get("teacher_answer") for r in seen["teacher"]} == {
        pid: stored[pid][1] if int(pid[1:]) % 2 == 0 else None for pid in sent}
