"""A lost node: an actor that the alive nodes can no longer hold (with the run's other actors) is
reported at once, by name, instead of after wait_alive's 10-minute timeout."""

import pytest

from actors import lifecycle
from actors.lifecycle import ActorUnplaceable, check_placeable, register_run
from driver.cluster import placement_problems

DEMANDS = [("teacher-0", {"CPU": 1.0, "t": 1.0}), ("teacher-1", {"CPU": 1.0, "t": 1.0}),
           ("learner-0", {"CPU": 1.0, "l": 1.0})]


class FakeActor:
    def __init__(self, i):
        self._actor_id = type("Id", (), {"hex": lambda _: f"id{i}"})()


def test_wait_alive_names_the_actor_that_cannot_come_back(monkeypatch):
    a = {"Alive": True, "Resources": {"CPU": 3.0, "t": 1.0, "node:10.0.0.1": 1.0, "memory": 1e9}}
    b = {"Alive": True, "Resources": {"CPU": 3.0, "l": 1.0}}
    c = {"Alive": True, "Resources": {"CPU": 2.0, "t": 1.0}}
    nodes = [a, b, c]
    monkeypatch.setattr(lifecycle.ray, "nodes", lambda: nodes)
    monkeypatch.setattr(lifecycle, "_RUN", {"names": {}, "problems": None})
    t0, t1 = FakeActor(0), FakeActor(1)
    check_placeable(t0)  # nothing registered: nothing to say
    register_run({"teacher-0": t0, "teacher-1": t1}, lambda n: placement_problems(DEMANDS, n))
    check_placeable(t0)  # all nodes there: fine
    c["Alive"] = False  # node c (teacher-0's) is lost; node a still has a `t`, but teacher-1 holds it
    with pytest.raises(ActorUnplaceable) as e:
        lifecycle.wait_alive(t0)
    assert str(e.value) == (
        "teacher-0 cannot be placed again: the alive nodes ({CPU: 3, t: 1}; {CPU: 3, l: 1}) no longer hold "
        "the run's actors (t: requested 2, available 1); a node was lost? Add one and resume from the last "
        "checkpoint")
