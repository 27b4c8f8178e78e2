"""Recovering from dead actors: the replay buffer (reloaded from the last checkpoint) and learner
ranks (the driver restarts the group, see ``driver.online.Trainer``)."""

from __future__ import annotations

import sys
from pathlib import Path

import ray

from actors.lifecycle import wait_alive
from driver.runs import intact_checkpoint


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint by name, unverified (``driver.runs.intact_checkpoint`` verifies)."""
    ckpts = sorted((run_dir / "checkpoints").glob("step-*"))
    return ckpts[-1] if ckpts else None


def answers(actor) -> bool:
    """False when the actor is dead or being restarted."""
    try:
        ray.get(actor.ready.remote(), timeout=30)
        return True
    except ray.exceptions.RayActorError:
        return False


def first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:300]


class LearnerDied(Exception):
    """A learner rank died during a step (the buffer still answers)."""

    def __init__(self, ref):
        super().__init__("a learner rank died")
        self.ref = ref

    def cause(self) -> str:
        try:
            ray.get(self.ref)
        except Exception as e:  # noqa: BLE001 - report whatever Ray says, in one line
            return first_line(e)
        return "unknown"


class BufferGuard:
    """Brings the replay buffer back after Ray restarted it (empty): reloads the last checkpoint's
    buffer, once per death however many calls saw it fail, and counts the rows that were added
    since that save (the most that can have been lost). Every blocking driver call to the buffer
    goes through ``call``, which recovers and retries."""

    def __init__(self, buffer, run_dir: Path, pairs_added):
        self.buffer, self.run_dir, self.pairs_added = buffer, run_dir, pairs_added
        self.generation = 0  # deaths recovered so far; requests remember the one they were sent in
        self.restores = self.rows_lost = 0
        self.rows_at_save = 0  # pairs added when the last checkpoint was written
        self.version = 0
        self.overflow = False
        self.incarnation = ray.get(buffer.ready.remote())

    def call(self, method: str, *args):
        for _ in range(5):
            seen = self.generation
            try:
                return ray.get(getattr(self.buffer, method).remote(*args))
            except ray.exceptions.RayActorError:
                self.lost(seen)
        raise RuntimeError(f"the replay buffer kept dying during {method}()")

    def lost(self, seen_generation: int) -> None:
        """A call to the buffer failed: if the buffer restarted (empty), restore it."""
        if seen_generation != self.generation:
            return  # already recovered
        wait_alive(self.buffer)
        incarnation = ray.get(self.buffer.ready.remote())
        if incarnation == self.incarnation:
            return  # the same buffer answers: the failure was elsewhere
        ckpt = intact_checkpoint(self.run_dir)
        if ckpt is not None:
            ray.get(self.buffer.load.remote(str(ckpt / "buffer.parquet")))
        ray.get(self.buffer.set_version.remote(self.version))
        ray.get(self.buffer.set_overflow.remote(self.overflow))
        lost = self.pairs_added() - self.rows_at_save
        self.incarnation = incarnation
        self.generation += 1
        self.restores += 1
        self.rows_lost += lost
        print(f"raykd: the replay buffer died; restored from {ckpt or 'empty'} "
              f"({lost} rows added since that save are lost)", file=sys.stderr)

    def check(self, stats: dict) -> dict:
        """Catch a restart that no failed call revealed (the buffer died and came back between calls)."""
        if stats.get("incarnation", self.incarnation) != self.incarnation:
            self.lost(self.generation)
            return self.call("stats")
        return stats

    def set_overflow(self, on: bool) -> None:
        self.overflow = on
        self.call("set_overflow", on)
