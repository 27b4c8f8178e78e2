"""What fills the replay buffer: the online producer chain (samplers -> teachers -> buffer) and the
offline one (slices of a generated dataset -> buffer), plus the prompt stream they draw from."""

from __future__ import annotations

import json
import math
import random
import statistics
import time
from collections import deque
from pathlib import Path

import ray

from actors.lifecycle import replaceable, wait_alive
from driver.config import Config
from driver.recovery import BufferGuard


def _count_by_teacher(names) -> dict[str, int]:
    """``{teacher pool: rows}``; a row with no name (one teacher; data written before names) is 'default'."""
    out: dict[str, int] = {}
    for name in names:
        out[name or "default"] = out.get(name or "default", 0) + 1
    return out


class PromptStream:
    """Cycles through the prompts; epoch e visits them in an order fixed by (seed, e)."""

    def __init__(self, requests: list[dict], seed: int, epoch: int = 0, pos: int = 0):
        self.requests, self.seed = requests, seed
        self.epoch, self.pos = epoch, pos
        self._order = self._order_for(epoch)

    def _order_for(self, epoch: int) -> list[int]:
        order = list(range(len(self.requests)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def take(self, n: int) -> tuple[int, list[dict]]:
        """(epoch of the first prompt, n prompts); an epoch boundary may fall inside a batch."""
        out, epoch = [], None
        while len(out) < n:
            if self.pos == len(self._order):
                self.epoch, self.pos = self.epoch + 1, 0
                self._order = self._order_for(self.epoch)
            if epoch is None:
                epoch = self.epoch  # the epoch of the first prompt, after any roll-over
            out.append(self.requests[self._order[self.pos]])
            self.pos += 1
        return epoch, out

    def state(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}


class Pace:
    """How many learner steps of rows the online producers may hold ahead (``sampler.max_steps_ahead``).

    A number is kept as it is. ``auto`` follows Little's law: while one request is answered (latency
    L, from the sampler's call to the rows landing in the buffer) the learner takes a batch every S
    seconds (its own ``train_step_s``), so L / S steps of rows must already be in flight, plus the
    batch it trains on: ``1 + ceil(L / S)``, from the medians of the last ``window`` of each. It is at
    least ``FLOOR`` (and enough for buffer.min_size_to_train) and at most buffer.max_policy_lag x
    sync.every_steps, beyond which the rows would be too old when a step reaches them. Until both are
    measured it is ``FLOOR``. The law holds when the producers' latency does not grow with the work in
    flight: producers on their own devices. On cores shared with the learner the extra requests slow
    the learner's own step instead (benchmarks/pacing.py), which is why a number, 2, is the default.
    """

    FLOOR = 2

    def __init__(self, cfg: Config, window: int = 8):
        value = cfg.sampler.max_steps_ahead
        self.auto = value == "auto"
        self.lo = max(self.FLOOR, math.ceil(cfg.buffer.min_size_to_train / cfg.learner.batch_size))
        self.hi = max(self.lo, cfg.buffer.max_policy_lag * cfg.sync.every_steps)
        self.steps = self.lo if self.auto else value
        self.latencies: deque[float] = deque(maxlen=window)
        self.step_times: deque[float] = deque(maxlen=window)

    def answered(self, latency_s: float) -> None:
        self.latencies.append(latency_s)
        self._update()

    def stepped(self, seconds: float | None) -> None:
        if seconds is not None and seconds > 0:
            self.step_times.append(seconds)
            self._update()

    def _update(self) -> None:
        if self.auto and self.latencies and self.step_times:
            need = 1 + math.ceil(statistics.median(self.latencies) / statistics.median(self.step_times))
            self.steps = min(self.hi, max(self.lo, need))


class OnlineProducer:
    """Keeps every sampler's request chain full; logs each request's prompts once they are added.

    A request whose sampler or teacher died is sent again (Ray restarts the actor; a restarted
    sampler first gets the current weights, and a teacher request goes to another replica when there
    is one). A request is logged as consumed only once its rows are in the buffer, so no prompt is
    lost and none is added twice.
    """

    def __init__(self, cfg: Config, actors, stream: PromptStream, consumed: Path, sync=None,
                 recovered: dict | None = None, guard: BufferGuard | None = None, needs: dict | None = None,
                 answers: dict | None = None):
        self.cfg, self.actors, self.stream, self.consumed, self.sync = cfg, actors, stream, consumed, sync
        self.guard = guard
        # what the phase's loss reads (kd.objective.loss_needs): no sampler call for a loss that never
        # reads y_s, no teacher generation for one that never reads y_t
        self.needs = needs or {"y_t": True, "y_s": True, "teacher_scores_y_s": True}
        # the phase's teacher_answers (driver.offline.load_answers): y_t the teacher need not generate
        self.answers = answers or {}
        # pacing (sampler.max_steps_ahead): rows the learner has not taken, as last counted by the buffer
        # (``held``) plus those landed since; with the prompts in flight they stay under ``ahead``
        self.pace = Pace(cfg)
        self.clock = time.perf_counter  # a request's latency, for the pace
        self.untrained = 0
        self.split = cfg.buffer.rows == "object_store"  # rows stay where the teacher put them
        self.in_flight: dict = {}  # add ref -> request (dict: sampler, gen, pair, epoch, reqs, seed)
        self.per_sampler = [0] * len(actors.samplers)
        self.sent = 0
        self.taken = 0  # prompts taken since the trainer last counted them
        self.recovered = recovered if recovered is not None else {"sampler": 0, "teacher": 0}

    def held(self, untrained: int) -> None:
        """The buffer's count of rows no learner has taken (its ``stats()['unconsumed']``)."""
        self.untrained = untrained

    def took(self, n: int) -> None:
        """A learner step asked the buffer for ``n`` rows: room for as many new prompts."""
        self.untrained = max(0, self.untrained - n)

    def stepped(self, seconds: float | None) -> None:
        """A learner step took ``seconds`` of the learner's own time (its ``train_step_s``)."""
        self.pace.stepped(seconds)

    @property
    def ahead(self) -> int:
        """The bound on untrained rows plus prompts in flight (0: none)."""
        return self.pace.steps * self.cfg.learner.batch_size

    def _room(self) -> bool:
        in_flight = sum(len(r["reqs"]) for r in self.in_flight.values())
        return not self.ahead or self.untrained + in_flight < self.ahead

    def top_up(self, version: int) -> None:
        for i in range(len(self.actors.samplers)):
            while self.per_sampler[i] < self.cfg.sampler.max_in_flight and self._room():
                epoch, reqs = self.stream.take(self.cfg.sampler.prompts_per_request)
                self.taken += len(reqs)
                self._send({"sampler": i, "epoch": epoch, "reqs": self._with_answers(reqs),
                            "seed": self.cfg.run.seed * 1_000_003 + self.sent})
                self.per_sampler[i] += 1
                self.sent += 1

    def _with_answers(self, reqs: list[dict]) -> list[dict]:
        """Each prompt with its stored teacher answer (``teacher_answer``) when the dataset has one for
        exactly this primed prompt; the others are left for the teacher to answer."""
        out = []
        for r in reqs:
            primed, answer = self.answers.get(r["prompt_id"], (None, None))
            out.append({**r, "teacher_answer": answer} if primed == r["teacher_prompt_ids"] else r)
        return out

    def _send(self, req: dict, gen=None, avoid_teacher: int | None = None) -> None:
        req["sent_at"] = self.clock()
        if gen is None and self.needs["y_s"]:
            # the sampler reads the prompt; a stored teacher answer is the teacher pool's alone
            sampler_reqs = [{k: v for k, v in r.items() if k != "teacher_answer"} for r in req["reqs"]]
            gen = self.actors.samplers[req["sampler"]].generate.remote(sampler_reqs, seed=req["seed"])
        pair = self.actors.teachers.submit(req["reqs"], gen, avoid=avoid_teacher, needs=self.needs, split=self.split)
        self._add(req, gen, pair)

    def _add(self, req: dict, gen, pair) -> None:
        generation = self.guard.generation if self.guard else 0
        # one id per request (no prompt repeats within an epoch): the buffer drops a re-sent duplicate
        request_id = f"{req['epoch']}:" + ",".join(r["prompt_id"] for r in req["reqs"])
        if isinstance(pair, tuple):  # (meta, rows): the buffer gets the rows' ref, not the rows
            add = self.actors.buffer.add_ref.remote(pair[0], [pair[1]], None, request_id)
        else:
            add = self.actors.buffer.add.remote(pair, None, request_id)
        self.in_flight[add] = {**req, "gen": gen, "pair": pair, "buffer_generation": generation}

    def pending(self) -> list:
        return list(self.in_flight)

    def complete(self, ref) -> dict[str, int]:
        """Rows the finished request added to the buffer, per teacher pool (empty if it is re-sent)."""
        req = self.in_flight.pop(ref)
        teacher = self.actors.teachers.done(req["pair"])
        try:
            added = ray.get(ref)  # raises the producer's error, if any
        except ray.exceptions.RayActorError:
            self._resend(req, teacher)
            return {}
        self.per_sampler[req["sampler"]] -= 1
        self.untrained += added
        self.pace.answered(self.clock() - req["sent_at"])
        with open(self.consumed, "a") as f:
            f.write(json.dumps({"epoch": req["epoch"], "prompt_ids": [r["prompt_id"] for r in req["reqs"]]}) + "\n")
        # the buffer takes a request whole or (a re-sent duplicate) not at all
        return _count_by_teacher(r.get("teacher") for r in req["reqs"][:added])

    def _resend(self, req: dict, teacher: int | None) -> None:
        try:
            if req["gen"] is not None:
                ray.get(req["gen"])
        except ray.exceptions.RayActorError:  # the sampler died: Ray restarts it; it needs the weights
            self.recovered["sampler"] += 1
            wait_alive(self.actors.samplers[req["sampler"]])
            if self.sync is not None:
                self.sync.resend_to(req["sampler"])
            self._send(req)
            return
        try:
            ray.get(req["pair"][0] if isinstance(req["pair"], tuple) else req["pair"])
        except ray.exceptions.RayActorError:
            pass
        else:  # sampler and teacher answered: the buffer died
            if self.guard is None:
                raise
            self.guard.lost(req["buffer_generation"])
            self._add(req, req["gen"], req["pair"])
            return
        self.recovered["teacher"] += 1  # the teacher died: its request goes to another replica
        pool = self.actors.teachers
        if teacher is not None and teacher not in pool.retired:
            if not replaceable(pool.workers[teacher]):
                pool.retire(teacher)  # its node is gone for good: the others go on without it
            elif len(pool.active) == 1:
                wait_alive(pool.workers[teacher])
        self._send(req, gen=req["gen"], avoid_teacher=teacher)

    def state(self) -> dict:
        assert not self.in_flight, "drain before saving producer state"
        return {"stream": self.stream.state()}


class OfflineProducer:
    """Feeds a generated dataset into the buffer in slices, cycling over it."""

    def __init__(self, cfg: Config, buffer, table, epoch: int = 0, pos: int = 0,
                 guard: BufferGuard | None = None):
        self.buffer, self.table, self.guard = buffer, table, guard
        self.chunk = cfg.sampler.prompts_per_request
        self.epoch, self.pos = epoch, pos
        self.in_flight: dict = {}
        self.taken = 0  # counts prompts of the online stream only

    def held(self, untrained: int) -> None:  # (pacing is the online producers'; slices are bounded below)
        pass

    def took(self, n: int) -> None:
        pass

    def stepped(self, seconds: float | None) -> None:
        pass

    def top_up(self, version: int) -> None:
        while len(self.in_flight) < 2:
            if self.pos >= self.table.num_rows:
                self.epoch, self.pos = self.epoch + 1, 0
            rows = self.table.slice(self.pos, self.chunk)
            self._add(rows, f"offline:{self.epoch}:{self.pos}")
            self.pos += rows.num_rows

    def _add(self, rows, request_id: str) -> None:
        self.in_flight[self.buffer.add.remote(rows, None, request_id)] = (
            rows, request_id, self.guard.generation if self.guard else 0)

    def pending(self) -> list:
        return list(self.in_flight)

    def complete(self, ref) -> dict[str, int]:
        """Rows the finished slice added to the buffer, per teacher pool (empty if it is re-sent)."""
        rows, request_id, generation = self.in_flight.pop(ref)
        try:
            added = ray.get(ref)
        except ray.exceptions.RayActorError:
            if self.guard is None:
                raise
            self.guard.lost(generation)
            self._add(rows, request_id)
            return {}
        names = rows.column("teacher_name").to_pylist() if "teacher_name" in rows.column_names else []
        return _count_by_teacher(names[:added] if names else [None] * added)

    def state(self) -> dict:
        assert not self.in_flight, "drain before saving producer state"
        return {"epoch": self.epoch, "pos": self.pos}


class Drained:
    """Stands in for a producer at the end of the run, when nothing is in flight."""

    taken = 0

    def pending(self) -> list:
        return []

    def state(self) -> dict:
        return {}
