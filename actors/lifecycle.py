"""Living with actors that Ray restarts after a failure."""

from __future__ import annotations

import time

import ray

from kd.errors import UserInputError

# The run's actors by id, and a function saying why a set of nodes cannot hold all of the run's actors
# (registered by whoever creates them), so that a restart that can never happen (a node is gone and
# the rest cannot hold every actor) is reported at once instead of after ``wait_alive``'s timeout.
_RUN: dict = {"names": {}, "problems": None}


class ActorUnplaceable(UserInputError):
    """The cluster shrank (a node was lost) below what the run's actors need: a cluster-size problem."""


def register_run(actors: dict[str, object], problems) -> None:
    """``actors``: name -> handle; ``problems(nodes) -> list[str]``: why the run's actors (all of them:
    an alive actor keeps its resources) cannot be placed on nodes with these total resources."""
    _RUN["names"] = {a._actor_id.hex(): name for name, a in actors.items()}
    _RUN["problems"] = problems


def check_placeable(actor) -> None:
    name, problems = _RUN["names"].get(actor._actor_id.hex()), _RUN["problems"]
    if name is None or problems is None:
        return
    nodes = [dict(n.get("Resources", {})) for n in ray.nodes() if n.get("Alive")]
    why = problems(nodes)
    if why:
        have = "; ".join(_fmt(n) for n in nodes) or "none"
        raise ActorUnplaceable(f"{name} cannot be placed again: the alive nodes ({have}) no longer hold the "
                               f"run's actors ({'; '.join(why)}); a node was lost? Add one and resume from "
                               "the last checkpoint")


def _fmt(res: dict) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(res.items())
                           if v and not k.startswith(("node:", "memory", "object_store_memory"))) + "}"


def wait_alive(actor, timeout: float = 600.0) -> None:
    """Block until ``actor`` (possibly being restarted by Ray) answers its ``ready()`` again; raise
    ``ActorUnplaceable`` as soon as no alive node could ever hold it."""
    deadline = time.monotonic() + timeout
    while True:
        check_placeable(actor)  # before the call: a ready() to an actor that cannot be placed waits 30 s
        try:
            ray.get(actor.ready.remote(), timeout=30)
            return
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
