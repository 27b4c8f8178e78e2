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
    monkeypatch.setattr(lifecycle, "_RUN", {"names": {}, "problems": None, "retired": set()})
    monkeypatch.setattr(lifecycle, "is_alive", lambda actor: False)  # restarting
    t0, t1 = FakeActor(0), FakeActor(1)
    check_placeable(t0)  # nothing registered: nothing to say
    register_run({"teacher-0": t0, "teacher-1": t1},
                 lambda n, without=(): placement_problems([d for d in DEMANDS if d[0] not in without], n))
    check_placeable(t0)  # all nodes there: fine
    c["Alive"] = False  # node c (teacher-0's) is lost; node a still has a `t`, but teacher-1 holds it
    with pytest.raises(ActorUnplaceable) as e:
        lifecycle.wait_alive(t0)
    assert str(e.value) == (
        "teacher-0 cannot be placed again: the alive nodes ({CPU: 3, t: 1}; {CPU: 3, l: 1}) no longer hold "
        "the run's actors (t: requested 2, available 1); a node was lost? Add one and resume from the last "
        "checkpoint")


def test_a_teacher_whose_node_is_gone_is_retired_and_the_others_go_on(monkeypatch):
    """Two teachers, one `t` slot left after a node loss: the lost teacher is out of the rotation (its
    resources no longer count, Ray stops restarting it) and requests go to the other; the last one is
    never retired: the run stops with the message naming what the nodes lack."""
    from actors.teacher_pool import TeacherPool

    a = {"Alive": True, "Resources": {"CPU": 3.0, "t": 1.0}}
    b = {"Alive": True, "Resources": {"CPU": 3.0, "l": 1.0}}
    c = {"Alive": True, "Resources": {"CPU": 2.0, "t": 1.0}}
    nodes = [a, b, c]
    killed = []
    monkeypatch.setattr(lifecycle.ray, "nodes", lambda: nodes)
    monkeypatch.setattr(lifecycle.ray, "kill", lambda actor, no_restart: killed.append((actor, no_restart)))
    monkeypatch.setattr(lifecycle, "_RUN", {"names": {}, "problems": None, "retired": set()})
    t0, t1 = FakeActor(0), FakeActor(1)
    alive = {"id0": True, "id1": True}
    monkeypatch.setattr(lifecycle, "is_alive", lambda actor: alive[actor._actor_id.hex()])
    register_run({"teacher-0": t0, "teacher-1": t1},
                 lambda n, without=(): placement_problems([d for d in DEMANDS if d[0] not in without], n))

    calls = iter(range(100))

    class Method:
        def __init__(self, i):
            self.i = i

        def remote(self, *args):
            return f"ref-{self.i}-{next(calls)}"

    class Worker(FakeActor):
        def __init__(self, i):
            super().__init__(i)
            self.make_pairs = Method(i)

    pool = TeacherPool.__new__(TeacherPool)  # the dispatch logic only; no Ray actors
    pool.workers, pool.in_flight, pool._owner, pool.retired = [Worker(0), Worker(1)], [0, 0], {}, set()
    pool.workers[0]._actor_id, pool.workers[1]._actor_id = t0._actor_id, t1._actor_id
    sent = [pool.submit([], None) for _ in range(2)]
    assert [pool._owner[r] for r in sent] == [0, 1]  # least loaded first, both in use

    c["Alive"], alive["id0"] = False, False  # teacher-0's node is gone; teacher-1 holds node a's `t`
    assert not lifecycle.replaceable(t0)
    for r in sent:
        pool.done(r)
    more = [pool.submit([], None) for _ in range(3)]
    assert [pool._owner[r] for r in more] == [1, 1, 1]  # never to teacher-0 again
    assert pool.retired == {0} and killed == [(pool.workers[0], True)]
    lifecycle.check_placeable(t1)  # without teacher-0, the rest fits: nothing to say

    b["Alive"], a["Alive"], alive["id1"] = False, False, False  # now the last teacher's node is gone too
    with pytest.raises(ActorUnplaceable, match="^teacher-1 cannot be placed again"):
        pool.submit([], None)
    assert pool.retired == {0}
