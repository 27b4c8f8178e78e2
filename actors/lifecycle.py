"""Living with actors that Ray restarts after a failure."""

from __future__ import annotations

import time

import ray


def wait_alive(actor, timeout: float = 600.0) -> None:
    """Block until ``actor`` (possibly being restarted by Ray) answers its ``ready()`` again."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            ray.get(actor.ready.remote(), timeout=30)
            return
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
