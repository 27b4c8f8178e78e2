"""Living with actors that Ray restarts after a failure."""

from __future__ import annotations

import time

import ray

from kd.errors import UserInputError

# The run's actors by id, and a function saying why a set of nodes cannot hold all of the run's actors
# (registered by whoever creates them), so that a restart that can never happen (a node is gone and
# the rest cannot hold every actor) is reported at once instead of after ``wait_alive``'s timeout.
_RUN: dict = {"names": {}, "problems": None, "retired": set()}


class ActorUnplaceable(UserInputError):
    """The cluster shrank (a node was lost) below what the run's actors need: a cluster-size problem."""


def register_run(actors: dict[str, object], problems) -> None:
    """``actors``: name -> handle; ``problems(nodes, without) -> list[str]``: why the run's actors (all
    of them but the names in ``without``: an alive actor keeps its resources) cannot be placed on nodes
    with these total resources."""
    _RUN["names"] = {a._actor_id.hex(): name for name, a in actors.items()}
    _RUN["problems"] = problems
    _RUN["retired"] = set()


def _why() -> tuple[list[str], list[dict]]:
    nodes = [dict(n.get("Resources", {})) for n in ray.nodes() if n.get("Alive")]
    return _RUN["problems"](nodes, _RUN["retired"]), nodes


def replaceable(actor) -> bool:
    """Whether the alive nodes could hold the run's other (not retired) actors and ``actor`` again:
    False once a lost node took a place that no other node has."""
    name = _RUN["names"].get(actor._actor_id.hex())
    return name is None or _RUN["problems"] is None or not _why()[0]


def retire(actor) -> str:
    """Take ``actor`` out of the run for good (its replica's node is gone; the others go on without it):
    its resources no longer count, and Ray stops trying to restart it. Returns its name."""
    name = _RUN["names"].get(actor._actor_id.hex(), "an actor")
    _RUN["retired"].add(name)
    ray.kill(actor, no_restart=True)
    return name


def check_placeable(actor) -> None:
    name = _RUN["names"].get(actor._actor_id.hex())
    if name is not None:
        check_run(name)


def check_run(name: str) -> None:
    """Raise ``ActorUnplaceable`` for ``name`` (an actor about to be placed again) when the alive nodes
    cannot hold the run's actors; nothing when no run is registered."""
    if _RUN["problems"] is None:
        return
    why, nodes = _why()
    if why:
        have = "; ".join(_fmt(n) for n in nodes) or "none"
        raise ActorUnplaceable(f"{name} cannot be placed again: the alive nodes ({have}) no longer hold the "
                               f"run's actors ({'; '.join(why)}); a node was lost? Add one and resume from "
                               "the last checkpoint")


def is_alive(actor) -> bool:
    """Whether Ray's control store has ``actor`` alive now (not restarting, not waiting for a node)."""
    try:
        info = ray._private.state.actors(actor_id=actor._actor_id.hex())
    except Exception:  # noqa: BLE001 - no answer is not a verdict: treat it as alive, ready() decides
        return True
    return (info or {}).get("State") in (None, "ALIVE")


def _fmt(res: dict) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(res.items())
                           if v and not k.startswith(("node:", "memory", "object_store_memory"))) + "}"


def wait_alive(actor, timeout: float = 600.0) -> None:
    """Block until ``actor`` (possibly being restarted by Ray) answers its ``ready()`` again; raise
    ``ActorUnplaceable`` as soon as no alive node could ever hold it."""
    deadline = time.monotonic() + timeout
    while True:
        if not is_alive(actor):  # before the call: a ready() to an actor that cannot be placed waits 30 s
            check_placeable(actor)
        try:
            ray.get(actor.ready.remote(), timeout=30)
            return
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
