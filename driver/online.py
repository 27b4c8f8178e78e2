"""The training loop: a schedule of offline and online phases; producers and learner run at once.

Online producer chain, per request of ``sampler.prompts_per_request`` prompts (ObjectRefs only,
nothing waits in the driver):  sampler.generate -> teacher.make_pairs -> buffer.add.
Offline producer: slices of a ``raykd generate`` dataset -> buffer.add.
Learner chain, per step:  buffer.sample -> learner.train_step; every ``sync.every_steps`` steps the
learner's weights go to every sampler and the policy version goes up.

Checkpoints (``checkpoint.every_steps`` and at the end) drain the producers first, so the buffer,
the prompt position and the learner state in a checkpoint agree exactly: a resumed run consumes no
prompt twice and loses none.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import ray

from driver.cluster import check_resources, create_actors, start_ray
from driver.config import Config, PhaseConfig
from actors.lifecycle import wait_alive
from actors.weight_sync import WeightSync
from actors.metrics import record_step
from driver.monitoring import MetricsLog, ProgressBar
from driver.prepare import Prepared


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


class LearnerDied(Exception):
    """A learner rank died during a step (the buffer still answers)."""

    def __init__(self, ref):
        super().__init__("a learner rank died")
        self.ref = ref

    def cause(self) -> str:
        try:
            ray.get(self.ref)
        except Exception as e:  # noqa: BLE001 - report whatever Ray says, in one line
            return _first_line(e)
        return "unknown"


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:300]


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
        ckpt = latest_checkpoint(self.run_dir)
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


class OnlineProducer:
    """Keeps every sampler's request chain full; logs each request's prompts once they are added.

    A request whose sampler or teacher died is sent again (Ray restarts the actor; a restarted
    sampler first gets the current weights, and a teacher request goes to another replica when there
    is one). A request is logged as consumed only once its rows are in the buffer, so no prompt is
    lost and none is added twice.
    """

    def __init__(self, cfg: Config, actors, stream: PromptStream, consumed: Path, sync=None,
                 recovered: dict | None = None, guard: BufferGuard | None = None):
        self.cfg, self.actors, self.stream, self.consumed, self.sync = cfg, actors, stream, consumed, sync
        self.guard = guard
        self.in_flight: dict = {}  # add ref -> request (dict: sampler, gen, pair, epoch, reqs, seed)
        self.per_sampler = [0] * len(actors.samplers)
        self.sent = 0
        self.taken = 0  # prompts taken since the trainer last counted them
        self.recovered = recovered if recovered is not None else {"sampler": 0, "teacher": 0}

    def top_up(self, version: int) -> None:
        for i in range(len(self.actors.samplers)):
            while self.per_sampler[i] < self.cfg.sampler.max_in_flight:
                epoch, reqs = self.stream.take(self.cfg.sampler.prompts_per_request)
                self.taken += len(reqs)
                self._send({"sampler": i, "epoch": epoch, "reqs": reqs,
                            "seed": self.cfg.run.seed * 1_000_003 + self.sent})
                self.per_sampler[i] += 1
                self.sent += 1

    def _send(self, req: dict, gen=None, avoid_teacher: int | None = None) -> None:
        if gen is None:
            gen = self.actors.samplers[req["sampler"]].generate.remote(req["reqs"], seed=req["seed"])
        pair = self.actors.teachers.submit(req["reqs"], gen, avoid=avoid_teacher)
        self._add(req, gen, pair)

    def _add(self, req: dict, gen, pair) -> None:
        generation = self.guard.generation if self.guard else 0
        # one id per request (no prompt repeats within an epoch): the buffer drops a re-sent duplicate
        request_id = f"{req['epoch']}:" + ",".join(r["prompt_id"] for r in req["reqs"])
        self.in_flight[self.actors.buffer.add.remote(pair, None, request_id)] = {
            **req, "gen": gen, "pair": pair, "buffer_generation": generation}

    def pending(self) -> list:
        return list(self.in_flight)

    def complete(self, ref) -> int:
        req = self.in_flight.pop(ref)
        teacher = self.actors.teachers.done(req["pair"])
        try:
            added = ray.get(ref)  # raises the producer's error, if any
        except ray.exceptions.RayActorError:
            self._resend(req, teacher)
            return 0
        self.per_sampler[req["sampler"]] -= 1
        with open(self.consumed, "a") as f:
            f.write(json.dumps({"epoch": req["epoch"], "prompt_ids": [r["prompt_id"] for r in req["reqs"]]}) + "\n")
        return added

    def _resend(self, req: dict, teacher: int | None) -> None:
        try:
            ray.get(req["gen"])
        except ray.exceptions.RayActorError:  # the sampler died: Ray restarts it; it needs the weights
            self.recovered["sampler"] += 1
            wait_alive(self.actors.samplers[req["sampler"]])
            if self.sync is not None:
                self.sync.resend_to(req["sampler"])
            self._send(req)
            return
        try:
            ray.get(req["pair"])
        except ray.exceptions.RayActorError:
            pass
        else:  # sampler and teacher answered: the buffer died
            if self.guard is None:
                raise
            self.guard.lost(req["buffer_generation"])
            self._add(req, req["gen"], req["pair"])
            return
        self.recovered["teacher"] += 1  # the teacher died: its request goes to another replica
        if len(self.actors.teachers.workers) == 1 and teacher is not None:
            wait_alive(self.actors.teachers.workers[teacher])
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

    def complete(self, ref) -> int:
        rows, request_id, generation = self.in_flight.pop(ref)
        try:
            return ray.get(ref)
        except ray.exceptions.RayActorError:
            if self.guard is None:
                raise
            self.guard.lost(generation)
            self._add(rows, request_id)
            return 0

    def state(self) -> dict:
        assert not self.in_flight, "drain before saving producer state"
        return {"epoch": self.epoch, "pos": self.pos}


def _answers(actor) -> bool:
    """False when the actor is dead or being restarted."""
    try:
        ray.get(actor.ready.remote(), timeout=30)
        return True
    except ray.exceptions.RayActorError:
        return False


def _probe(actors, prep: Prepared) -> str:
    """Sampler 0's greedy answer to the first prompt: shows (and tests) that new weights arrived."""
    gen = ray.get(actors.samplers[0].generate.remote(prep.requests[:1], greedy=True))[0]
    return prep.tokenizer.decode(gen.token_ids)


def latest_checkpoint(run_dir: Path) -> Path | None:
    ckpts = sorted((run_dir / "checkpoints").glob("step-*"))
    return ckpts[-1] if ckpts else None


class Trainer:
    """The driver's state for one run: which phase and step, which policy version, what was added."""

    def __init__(self, cfg: Config, prep: Prepared, actors, progress: bool, evaluator=None):
        self.cfg, self.prep, self.actors = cfg, prep, actors
        self.run_dir = prep.run_dir
        self.phases: list[PhaseConfig] = cfg.phases()
        self.sync = WeightSync(actors.learners, actors.samplers, mode=cfg.sync.mode, bucket_mb=cfg.sync.bucket_mb)
        self.log = MetricsLog(self.run_dir / "metrics.jsonl")
        self.evaluator = evaluator
        self.last_eval: dict = {}
        self.consumed = self.run_dir / "consumed.jsonl"
        self.progress = progress
        self.step = self.version = self.phase_index = self.phase_step = self.pairs_added = 0
        self.producer_state: dict = {}
        self.recovered = {"sampler": 0, "teacher": 0}  # requests re-sent after an actor died
        self.guard = BufferGuard(actors.buffer, self.run_dir, lambda: self.pairs_added)
        self.learner_restarts = 0
        self.prompts_requested = 0  # online prompts taken from the stream (all of them end up consumed)
        self.elapsed_before = 0.0
        self.sync_seconds = 0.0

    # -- checkpoints ------------------------------------------------------------------------

    def save_checkpoint(self, producer) -> Path:
        self._drain(producer)  # everything taken is in the buffer
        root = self.run_dir / "checkpoints"
        final = root / f"step-{self.step:06d}"
        tmp = root / f".tmp-step-{self.step:06d}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        self.actors.learners.save_checkpoint(str(tmp / "learner"))
        self.guard.call("save", str(tmp / "buffer.parquet"))
        if self.cfg.checkpoint.export_hf:
            self.actors.learners.save_hf(str(tmp / "hf"), self.prep.student_path)
        state = {"step": self.step, "version": self.version, "phase_index": self.phase_index,
                 "phase_step": self.phase_step, "pairs_added": self.pairs_added,
                 "prompts_requested": self.prompts_requested,
            "buffer_restores": self.guard.restores, "buffer_rows_lost": self.guard.rows_lost,
            "learner_restarts": self.learner_restarts,
                 "producer": producer.state(), "elapsed_s": self._elapsed(),
                 "metrics_rows": self.step, "consumed_lines": _count_lines(self.consumed)}
        (tmp / "driver_state.json").write_text(json.dumps(state, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)  # a crash before this line leaves the previous checkpoint intact
        self.guard.rows_at_save = self.pairs_added
        for old in sorted(root.glob("step-*"))[: -self.cfg.checkpoint.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def _restart_learners(self, died: Exception, producer) -> None:
        """A learner rank died: restart the whole group from the last checkpoint (the ranks are one
        DeepSpeed group), rewinding the driver to it; after ``learner.max_restarts``, a clear stop.
        A rank that dies again during the restart counts as another restart."""
        self._drain(producer)  # what is in flight lands, then the restore rewinds it away
        while True:
            dead = [f"learner-{i}" for i, a in enumerate(self.actors.learners.learners) if not _answers(a)]
            who = ", ".join(dead) or "a learner rank"
            cause = died.cause() if isinstance(died, LearnerDied) else _first_line(died)
            ckpt = latest_checkpoint(self.run_dir)
            self.learner_restarts += 1
            if self.learner_restarts > self.cfg.learner.max_restarts or ckpt is None:
                why = ("no checkpoint to restart from (set checkpoint.every_steps)" if ckpt is None else
                       f"learner.max_restarts={self.cfg.learner.max_restarts} used up")
                raise RuntimeError(f"{who} died at step {self.step + 1}: {cause}; {why}")
            print(f"raykd: {who} died ({cause}); restarting the learner group from {ckpt.name} "
                  f"({self.learner_restarts}/{self.cfg.learner.max_restarts})", file=sys.stderr)
            try:
                self._new_learners_from(ckpt)
                return
            except ray.exceptions.RayActorError as again:
                died = again

    def _new_learners_from(self, ckpt: Path) -> None:
        from driver.cluster import make_learner_group

        self.actors.learners.shutdown()
        # a fresh name per restart: a killed actor's name is not always free again at once
        self.actors.learners = make_learner_group(self.cfg, self.prep.student_path,
                                                  name_prefix=f"learner-r{self.learner_restarts}")
        ray.get(self.actors.learners.ready_refs())
        self.sync = WeightSync(self.actors.learners, self.actors.samplers, mode=self.cfg.sync.mode,
                               bucket_mb=self.cfg.sync.bucket_mb)
        elapsed = self._elapsed()
        self.restore(ckpt, push_always=True)
        self.elapsed_before, self.t0 = elapsed, time.perf_counter()

    def restore(self, ckpt: Path, push_always: bool = False) -> None:
        state = json.loads((ckpt / "driver_state.json").read_text())
        self.actors.learners.load_checkpoint(str(ckpt / "learner"))
        self.guard.call("load", str(ckpt / "buffer.parquet"))
        for key in ("step", "version", "phase_index", "phase_step", "pairs_added", "prompts_requested"):
            setattr(self, key, state[key])
        self.guard.version, self.guard.rows_at_save = self.version, self.pairs_added
        self.producer_state, self.elapsed_before = state["producer"], state["elapsed_s"]
        _truncate_lines(self.log.path, state["metrics_rows"])
        _truncate_lines(self.consumed, state["consumed_lines"])
        if self.version > 0 or push_always:  # samplers must run the checkpoint's weights
            self.sync.push(self.version)
            self.sync.wait()
        self.guard.call("set_version", self.version)

    # -- the loop -----------------------------------------------------------------------------

    def _elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.t0

    def _producer(self, phase: PhaseConfig):
        st = self.producer_state
        if phase.kind == "offline":
            from driver.offline import read_dataset

            return OfflineProducer(self.cfg, self.actors.buffer, read_dataset(phase.data),
                                   st.get("epoch", 0), st.get("pos", 0), self.guard)
        s = st.get("stream", {})
        stream = PromptStream(self.prep.requests, self.cfg.run.seed, s.get("epoch", 0), s.get("pos", 0))
        return OnlineProducer(self.cfg, self.actors, stream, self.consumed, self.sync, self.recovered,
                              self.guard)

    def run(self) -> dict:
        with GracefulStop() as self.stop:
            return self._run()

    def _run(self) -> dict:
        self.t0 = time.perf_counter()
        self.probe_before = _probe(self.actors, self.prep)
        bar = ProgressBar(self.cfg.total_steps(), enabled=self.progress,
                          buffer_capacity=self.cfg.buffer.capacity, initial=self.step)
        every = self.cfg.checkpoint.every_steps
        while self.phase_index < len(self.phases):
            phase = self.phases[self.phase_index]
            producer = self._producer(phase)
            try:
                while self.phase_step < phase.steps:
                    self._train_step(producer, phase, bar)
                    if self.stop.requested:  # SIGINT/SIGTERM: checkpoint, then stop cleanly
                        bar.close()
                        ckpt = self.save_checkpoint(producer)
                        return self._summary(interrupted_at=str(ckpt))
                    if every and self.step % every == 0:
                        self.save_checkpoint(producer)
            except (LearnerDied, ray.exceptions.RayActorError) as err:
                if not isinstance(err, LearnerDied) and all(_answers(a) for a in self.actors.learners.learners):
                    raise  # not a learner: nothing to restart here
                self._restart_learners(err, producer)
                bar.reset_to(self.step)
                continue  # the phase goes on from the restored state, with a new producer
            self._drain(producer)
            self.phase_index, self.phase_step, self.producer_state = self.phase_index + 1, 0, {}
            if self.phase_index < len(self.phases):
                self.guard.call("clear")  # rows of one phase's kind never leak into the next
        bar.close()
        if self.step % self.cfg.sync.every_steps:  # the samplers end on the final weights too
            self.version += 1
            self.sync.push(self.version)
        self.sync_seconds = self.sync.wait() or self.sync_seconds
        if not (every and self.step % every == 0):
            self.save_checkpoint(_Drained())
        return self._summary()

    def _summary(self, interrupted_at: str | None = None) -> dict:
        for actor in [*self.actors.teachers.workers, *self.actors.samplers]:
            wait_alive(actor)  # one may still be restarting after a failure
        self.sync.wait()
        probe_after = _probe(self.actors, self.prep)
        final = self.run_dir / "final"
        self.actors.learners.save_hf(str(final), self.prep.student_path)
        stats = self.guard.call("stats")
        summary = {
            "steps": self.step, "policy_version": self.version, "wall_s": self._elapsed(),
            "interrupted_at": interrupted_at, "recovered_requests": dict(self.recovered),
            "prompts_requested": self.prompts_requested,
            "buffer_restores": self.guard.restores, "buffer_rows_lost": self.guard.rows_lost,
            "learner_restarts": self.learner_restarts,
            "pairs_added": self.pairs_added, "buffer": stats,
            "sampler_versions": ray.get([s.version.remote() for s in self.actors.samplers]),
            "teachers": self.actors.teachers.stats(),
            "samplers": ray.get([s.stats.remote() for s in self.actors.samplers]),
            "first_loss": self.log.first.get("loss"), "last_loss": self.log.last.get("loss"),
            "final_model": str(final),
            **self.last_eval,
            "probe": {"prompt": self.prep.tokenizer.decode(self.prep.requests[0]["prompt_ids"]),
                      "before": self.probe_before, "after": probe_after},
        }
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        return summary

    def _drain(self, producer) -> None:
        """Wait for every request in flight (and any re-sent after a failure) to land. No learner
        consumes meanwhile, so the buffer may go over capacity instead of holding producers back."""
        if producer.pending():
            self.guard.set_overflow(True)
            while producer.pending():
                done, _ = ray.wait(producer.pending(), num_returns=1)
                self.pairs_added += producer.complete(done[0])
            self.guard.set_overflow(False)
        self.prompts_requested += producer.taken
        producer.taken = 0

    def _train_step(self, producer, phase: PhaseConfig, bar) -> None:
        cfg, actors = self.cfg, self.actors
        started, metrics = time.perf_counter(), None
        while metrics is None:
            generation, sampled_at = self.guard.generation, self.version
            batch = actors.buffer.sample.remote(cfg.learner.batch_size, self.version)
            train_ref = actors.learners.train_step(batch, phase.loss)
            while True:
                producer.top_up(self.version)
                done, _ = ray.wait([train_ref, *producer.pending()], num_returns=1)
                if done[0] != train_ref:
                    self.pairs_added += producer.complete(done[0])
                    continue
                try:
                    metrics = ray.get(train_ref)
                except ray.exceptions.RayActorError:
                    if not all(_answers(a) for a in actors.learners.learners):
                        raise LearnerDied(train_ref) from None  # the caller restarts the group
                    self.guard.lost(generation)  # the batch's buffer died; then take the step again
                break
        self.step += 1
        self.phase_step += 1
        if self.step % cfg.sync.every_steps == 0 and phase.kind == "online":
            self.version += 1
            self.guard.version = self.version
            self.sync_seconds = self.sync.wait() or self.sync_seconds
            self.sync.push(self.version)
            actors.buffer.set_version.remote(self.version)
        stats = self.guard.check(self.guard.call("stats"))
        batch_version = metrics.pop("batch_policy_version", None)
        row = {
            "step": self.step, "phase": self.phase_index, "phase_kind": phase.kind,
            "policy_version": self.version, **metrics,
            "policy_lag": sampled_at - batch_version if batch_version is not None and phase.kind == "online" else 0.0,
            "buffer_size": stats["size"], "buffer_dropped_stale": stats["dropped_stale"],
            "pairs_added": self.pairs_added, "samples_per_s": self.pairs_added / max(self._elapsed(), 1e-9),
            "step_time_s": time.perf_counter() - started, "weight_sync_s": self.sync_seconds,
            "elapsed_s": self._elapsed(),
        }
        if self.evaluator is not None and self.evaluator.due(self.step):
            self.last_eval = self.evaluator.run(self._generate)  # sees the weights just pushed
            row.update(self.last_eval)
        record_step(row)
        self.log.write(row)
        bar.update(row)

    def _generate(self, prompts: list[list[int]], seed: int | None = None) -> list[list[int]]:
        """Sampler 0's output for periodic evaluation: greedy unless eval.seeds gives a seed."""
        reqs = [{"prompt_ids": p} for p in prompts]
        gens = ray.get(self.actors.samplers[0].generate.remote(
            reqs, seed=seed, greedy=seed is None, max_new_tokens=self.cfg.eval.max_new_tokens))
        return [g.token_ids for g in gens]


class GracefulStop:
    """SIGINT/SIGTERM ask the loop to stop after the current step (it then checkpoints and shuts
    every actor down); a second signal interrupts at once."""

    def __init__(self):
        self.requested = False
        self._old: dict = {}

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(f"\nraykd: {signal.Signals(signum).name}: finishing this step, then checkpointing "
              "(again to abort)", file=sys.stderr)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


class _Drained:
    """Stands in for a producer at the end of the run, when nothing is in flight."""

    taken = 0

    def pending(self) -> list:
        return []

    def state(self) -> dict:
        return {}


def _count_lines(path: Path) -> int:
    if not path.exists():
        return 0
    with open(path) as f:
        return sum(1 for _ in f)


def _truncate_lines(path: Path, keep: int) -> None:
    """Keep the first ``keep`` lines: what an interrupted run wrote after its checkpoint is redone."""
    if not path.exists():
        return
    with open(path) as f:
        lines = f.readlines()[:keep]
    with open(path, "w") as f:
        f.writelines(lines)


def run_online(cfg: Config, prep: Prepared, progress: bool = True, resume: bool = False) -> dict:
    """Run the whole schedule (the name is historical: offline phases run here too)."""
    from driver.evaluate import PeriodicEval

    # built before any actor starts, so bad eval data fails fast
    evaluator = PeriodicEval(cfg, prep.tokenizer) if cfg.eval.every_steps else None
    started_ray = start_ray(cfg)
    try:
        check_resources(cfg)
        actors = create_actors(cfg, prep.teacher_path, prep.student_path)
        try:
            trainer = Trainer(cfg, prep, actors, progress, evaluator)
            if resume:
                ckpt = latest_checkpoint(prep.run_dir)
                if ckpt is None:
                    raise FileNotFoundError(f"{prep.run_dir}/checkpoints: no checkpoint to resume from")
                trainer.restore(ckpt)
            return trainer.run()
        finally:
            actors.shutdown()
    finally:
        if started_ray:
            ray.shutdown()
