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
import shutil
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import ray

from actors.lifecycle import ActorUnplaceable, check_run, wait_alive
from actors.metrics import record_step
from actors.weight_sync import WeightSync
from driver.cluster import check_resources, create_actors, start_ray
from driver.config import Config, PhaseConfig
from driver.monitoring import MetricsLog, ProgressBar
from driver.prepare import Prepared
from driver.producers import Drained, OfflineProducer, OnlineProducer, PromptStream
from driver.recovery import BufferGuard, LearnerDied, answers, first_line, latest_checkpoint
from driver.runs import (RunDirError, dir_bytes, intact_checkpoint, phase_position,
                         save_failed_on_a_full_disk, write_manifest)
from driver.trackers import Trackers

__all__ = ["Trainer", "run_online", "latest_checkpoint", "PromptStream"]


def _probe(actors, prep: Prepared) -> str:
    """Sampler 0's greedy answer to the first prompt: shows (and tests) that new weights arrived."""
    gen = ray.get(actors.samplers[0].generate.remote(prep.requests[:1], greedy=True))[0]
    return prep.tokenizer.decode(gen.token_ids)


class Trainer:
    """The driver's state for one run: which phase and step, which policy version, what was added."""

    def __init__(self, cfg: Config, prep: Prepared, actors, progress: bool, evaluator=None, trackers=None):
        self.cfg, self.prep, self.actors = cfg, prep, actors
        self.trackers = trackers or Trackers([])  # run.report_to: each gets what metrics.jsonl gets
        self.run_dir = prep.run_dir
        self.phases: list[PhaseConfig] = cfg.phases()
        self.sync = WeightSync(actors.learners, actors.samplers, mode=cfg.sync.mode, bucket_mb=cfg.sync.bucket_mb)
        self.log = MetricsLog(self.run_dir / "metrics.jsonl")
        self.evaluator = evaluator
        self.last_eval: dict = {}
        self.consumed = self.run_dir / "consumed.jsonl"
        self.progress = progress
        self.step = self.version = self.phase_index = self.phase_step = self.pairs_added = 0
        self.pairs_by_teacher: dict[str, int] = {}  # rows added to the buffer per teacher pool (sums to pairs_added)
        self.producer_state: dict = {}
        self.drained_state: dict = {}  # the last real producer's position once drained (see restore)
        self.recovered = {"sampler": 0, "teacher": 0}  # requests re-sent after an actor died
        self.guard = BufferGuard(actors.buffer, self.run_dir, lambda: self.pairs_added)
        self.learner_restarts = self.restarts_before = 0  # before: restarts in earlier sessions (--resume)
        self.prompts_requested = 0  # online prompts taken from the stream (all of them end up consumed)
        self.elapsed_before = 0.0
        self.sync_seconds = 0.0
        self.pushed_step = 0  # the step whose weights the samplers run (0: the initial student)
        self.eval_before: dict = {}  # held-out scores before training (eval.before_after)
        self.eval_teacher: dict = {}  # the teacher's, on the same prompts (eval.teacher)

    # -- checkpoints ------------------------------------------------------------------------

    def save_checkpoint(self, producer) -> Path:
        self._drain(producer)  # everything taken is in the buffer
        root = self.run_dir / "checkpoints"
        final = root / f"step-{self.step:06d}"
        tmp = root / f".tmp-step-{self.step:06d}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            self.actors.learners.save_checkpoint(str(tmp / "learner"))
            self.guard.call("save", str(tmp / "buffer.parquet"))
            if self.cfg.checkpoint.export_hf:
                self.actors.learners.save_hf(str(tmp / "hf"), self.prep.student_path)
        except Exception as e:
            last = latest_checkpoint(self.run_dir)  # unverified: no side effects on a failing path
            full = save_failed_on_a_full_disk(root, self.step, e, dir_bytes(last) if last else 0, self.run_dir)
            shutil.rmtree(tmp, ignore_errors=True)  # the partial save: its space back
            if full is not None:
                raise full from e
            raise
        state = {"step": self.step, "version": self.version, "phase_index": self.phase_index,
                 "phase_step": self.phase_step, "pairs_added": self.pairs_added,
                 "pairs_by_teacher": self.pairs_by_teacher,
                 "prompts_requested": self.prompts_requested,
                 "producer": producer.state(), "elapsed_s": self._elapsed(),
                 "eval_before": self.eval_before, "eval_teacher": self.eval_teacher,
                 "metrics_rows": self.step, "consumed_lines": _count_lines(self.consumed),
                 "faults": self._faults(), "drained_producer": self.drained_state}
        (tmp / "driver_state.json").write_text(json.dumps(state, indent=1))
        write_manifest(tmp)  # last: a checkpoint whose files all match it is whole
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
            dead = [f"learner-{i}" for i, a in enumerate(self.actors.learners.learners) if not answers(a)]
            who = ", ".join(dead) or "a learner rank"
            cause = died.cause() if isinstance(died, LearnerDied) else first_line(died)
            ckpt = intact_checkpoint(self.run_dir)
            self.learner_restarts += 1
            if self.learner_restarts - self.restarts_before > self.cfg.learner.max_restarts:
                raise RuntimeError(f"{who} died at step {self.step + 1}: {cause}; "
                                   f"learner.max_restarts={self.cfg.learner.max_restarts} used up")
            where = ckpt.name if ckpt else "the initial weights (no checkpoint yet: back to step 0)"
            print(f"raykd: {who} died ({cause}); restarting the learner group from {where} "
                  f"({self.learner_restarts - self.restarts_before}/{self.cfg.learner.max_restarts})",
                  file=sys.stderr)
            check_run(who)  # its node is gone and no other can hold it: say so now, not after a timeout
            try:
                self._new_learners_from(ckpt)
                return
            except ray.exceptions.RayActorError as again:
                died = again

    def _new_learners_from(self, ckpt: Path | None) -> None:
        from driver.cluster import make_learner_group

        self.actors.learners.shutdown()
        # a fresh name per restart: a killed actor's name is not always free again at once
        self.actors.learners = make_learner_group(self.cfg, self.prep.student_path,
                                                  name_prefix=f"learner-r{self.learner_restarts}")
        ray.get(self.actors.learners.ready_refs())
        self.sync = WeightSync(self.actors.learners, self.actors.samplers, mode=self.cfg.sync.mode,
                               bucket_mb=self.cfg.sync.bucket_mb)
        elapsed = self._elapsed()
        if ckpt is None:
            self.rewind_to_start()
        else:
            self.restore(ckpt, push_always=True)
        self.elapsed_before, self.t0 = elapsed, time.perf_counter()

    def restore(self, ckpt: Path, push_always: bool = False, faults: bool = False) -> None:
        """Rewind to ``ckpt``; ``faults``: also take its fault counters (a --resume, not a restart)."""
        state = json.loads((ckpt / "driver_state.json").read_text())
        self.actors.learners.load_checkpoint(str(ckpt / "learner"))
        self.guard.call("load", str(ckpt / "buffer.parquet"))
        for key in ("step", "version", "phase_index", "phase_step", "pairs_added", "prompts_requested"):
            setattr(self, key, state[key])
        self.phase_index, self.phase_step = phase_position(self.phases, self.step, self.phase_index, self.phase_step)
        self.guard.version, self.guard.rows_at_save = self.version, self.pairs_added
        self.producer_state, self.elapsed_before = self._producer_state(state), state["elapsed_s"]
        self.drained_state = state.get("drained_producer", {})
        self.eval_before, self.eval_teacher = state.get("eval_before", {}), state.get("eval_teacher", {})
        # a checkpoint from before this count existed: its rows are not attributable, count from here
        self.pairs_by_teacher = dict(state.get("pairs_by_teacher", {}))
        if faults:
            self._set_faults(state.get("faults", {}))
        _truncate_lines(self.log.path, state["metrics_rows"])
        _truncate_lines(self.consumed, state["consumed_lines"])
        if self.version > 0 or push_always:  # samplers must run the checkpoint's weights
            self.sync.push(self.version)
            self.sync.wait()
        self.pushed_step = self.step
        self.guard.call("set_version", self.version)

    def _producer_state(self, state: dict) -> dict:
        """The saved position of this phase's producer; a finished phase that a config change
        extended goes on from where its producer stopped (no prompt twice)."""
        if self.phase_index == state["phase_index"]:
            return state["producer"]
        return state.get("drained_producer", {}) if self.phase_index == state["phase_index"] - 1 else {}

    def rewind_to_start(self) -> None:
        """Back to step 0 with the initial weights (a learner died before the first checkpoint):
        the same rewind as a restore, to an empty buffer and the start of the prompts."""
        for key in ("step", "version", "phase_index", "phase_step", "pairs_added", "prompts_requested"):
            setattr(self, key, 0)
        self.pairs_by_teacher = {}
        self.producer_state = self.drained_state = {}
        self.guard.call("reset")
        self.guard.version = self.guard.rows_at_save = 0
        _truncate_lines(self.log.path, 0)
        _truncate_lines(self.consumed, 0)
        self.sync.push(0)  # the samplers run the initial weights again
        self.sync.wait()
        self.pushed_step = 0

    def _faults(self) -> dict:
        return {"buffer_restores": self.guard.restores, "buffer_rows_lost": self.guard.rows_lost,
                "learner_restarts": self.learner_restarts, "recovered_requests": dict(self.recovered)}

    def _set_faults(self, faults: dict) -> None:
        self.guard.restores = faults.get("buffer_restores", 0)
        self.guard.rows_lost = faults.get("buffer_rows_lost", 0)
        self.learner_restarts = self.restarts_before = faults.get("learner_restarts", 0)
        self.recovered.update(faults.get("recovered_requests", {}))  # the producers share this dict

    # -- the loop -----------------------------------------------------------------------------

    def _elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.t0

    def _producer(self, phase: PhaseConfig):
        st = self.producer_state
        if phase.kind == "offline":
            from driver.offline import read_dataset

            return OfflineProducer(self.cfg, self.actors.buffer, read_dataset(phase.data or self.teacher_data),
                                   st.get("epoch", 0), st.get("pos", 0), self.guard)
        s = st.get("stream", {})
        stream = PromptStream(self.prep.requests, self.cfg.run.seed, s.get("epoch", 0), s.get("pos", 0))
        from kd.objective import loss_needs

        answers = None
        if phase.teacher_answers is not None:
            from driver.offline import answers_source, load_answers

            answers = load_answers(answers_source(self.phases, self.phase_index) or self.teacher_data)
        return OnlineProducer(self.cfg, self.actors, stream, self.consumed, self.sync, self.recovered,
                              self.guard, loss_needs(phase.loss), answers)

    def run(self) -> dict:
        with GracefulStop() as self.stop:
            return self._run()

    @property
    def teacher_data(self) -> Path:
        """Where the run writes the dataset of an offline phase that names none."""
        return self.run_dir / "teacher-data"

    def _generate_teacher_data(self) -> None:
        """The offline phases without ``data`` train on this run's teacher's responses to its prompts,
        generated first by the run's own teacher pool (resumable: finished shards are kept)."""
        from driver.offline import generate_with, teacher_stamp

        if any(p.kind == "offline" and p.data is None for p in self.phases[self.phase_index:]):
            print(f"raykd: the offline phase's teacher data: {self.teacher_data}", file=sys.stderr)
            stamp = teacher_stamp(self.cfg.models.teacher, self.prep.teacher_path, self.prep.tokenizer,
                                  text_path=bool(self.prep.text_pools))
            done = generate_with(self.actors.teachers, self.cfg, self.prep.requests, self.prep.skipped_overlong,
                                 self.teacher_data, stamp, progress=self.progress)
            kept = done["shards"] - done["written"]  # a resumed run keeps the shards it finished
            print(f"raykd: teacher data: {done['written']} shard(s) generated"
                  + (f", {kept} kept from before" if kept else "") + f" ({done['prompts']} prompts)",
                  file=sys.stderr)

    def _evaluate(self, actor) -> dict:
        """Held-out scores of ``actor``'s current weights (a sampler, or a teacher replica)."""
        row = self.evaluator.run(lambda prompts, seed=None: self._generate(prompts, seed, actor))
        return {k.removeprefix("eval_"): v for k, v in row.items()}

    def _run(self) -> dict:
        self.t0 = time.perf_counter()
        self.probe_before = _probe(self.actors, self.prep)
        before = None
        if self.cfg.eval.before_after and self.step == 0:
            # the sampler's held-out answers while the teacher answers them and writes the teacher data:
            # the two actors' work overlaps (a thread here only waits on the sampler's calls)
            pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="eval-before")
            before = pool.submit(self._evaluate, self.actors.samplers[0])
            pool.shutdown(wait=False)
        if self.cfg.eval.teacher and not self.eval_teacher:
            self.eval_teacher = self._evaluate(self.actors.teachers.workers[0])
        self._generate_teacher_data()
        if before is not None:
            self.eval_before = before.result()
        bar = ProgressBar(self.cfg.total_steps(), enabled=self.progress,
                          buffer_capacity=self.cfg.buffer.capacity, initial=self.step)
        every = self.cfg.checkpoint.every_steps
        while self.phase_index < len(self.phases):
            phase = self.phases[self.phase_index]
            self.actors.learners.set_threads(self._learner_threads(phase))
            self.actors.learners.set_lr(phase.lr)
            producer = self._producer(phase)
            try:
                while self.phase_step < phase.steps:
                    self._train_step(producer, phase, bar)
                    if self.stop.requested:  # SIGINT/SIGTERM: checkpoint, then stop cleanly
                        bar.close()
                        if self.pushed_step != self.step:
                            # as at the end of a run: the samplers (the summary's probe) and the
                            # checkpoint's policy version are the weights trained so far; an offline
                            # phase has pushed none yet
                            self._push()
                        ckpt = self.save_checkpoint(producer)
                        return self._summary(interrupted_at=str(ckpt))
                    if every and self.step % every == 0:
                        self.save_checkpoint(producer)
            except (LearnerDied, ray.exceptions.RayActorError) as err:
                if not isinstance(err, LearnerDied) and all(answers(a) for a in self.actors.learners.learners):
                    raise  # not a learner: nothing to restart here
                self._restart_learners(err, producer)
                bar.reset_to(self.step)
                continue  # the phase goes on from the restored state, with a new producer
            self._drain(producer)
            if phase.kind == "offline" and self.pushed_step != self.step:
                self._push()  # the next phase samples from the student this phase trained
            self.phase_index, self.phase_step, self.producer_state = self.phase_index + 1, 0, {}
            if self.phase_index < len(self.phases):
                self.guard.call("clear")  # rows of one phase's kind never leak into the next
        bar.close()
        if self.pushed_step != self.step:  # the samplers end on the final weights too
            self._push()
        self.sync_seconds = self.sync.wait() or self.sync_seconds
        if not (every and self.step % every == 0):
            self.save_checkpoint(Drained())
        return self._summary()

    def _learner_threads(self, phase: PhaseConfig) -> int | str:
        """An offline phase reads rows from disk: no teacher or sampler works, so the learner may
        take the cores they leave (``learner.offline_torch_threads``; ``"auto"``: its node's share)."""
        lcfg = self.cfg.learner
        return lcfg.offline_torch_threads if phase.kind == "offline" and lcfg.offline_torch_threads else lcfg.torch_threads

    def _lost_actors(self) -> dict[str, str]:
        """Teachers and samplers that cannot come back (their node is gone): name -> why. The others
        are waited for (one may still be restarting after a failure)."""
        pool = self.actors.teachers
        lost = {f"teacher-{i}": "lost with its node during the run" for i in sorted(pool.retired)}
        for name, actor in [*((f"teacher-{i}", pool.workers[i]) for i in pool.active),
                            *((f"sampler-{i}", s) for i, s in enumerate(self.actors.samplers))]:
            try:
                wait_alive(actor)
            except ActorUnplaceable as e:
                lost[name] = str(e)
                if name.startswith("teacher-"):
                    pool.retired.add(int(name.split("-")[1]))  # no stats call to an actor that cannot answer
        for name, why in lost.items():
            if why.startswith(name):  # found now (a retired one was reported when it was retired)
                print(f"raykd: warning: {why}; the summary and the trained student are written without it",
                      file=sys.stderr)
        return lost

    def _summary(self, interrupted_at: str | None = None) -> dict:
        lost = self._lost_actors()
        samplers_ok = not any(name.startswith("sampler-") for name in lost)
        if samplers_ok:
            self.sync.wait()
        probe_after = _probe(self.actors, self.prep) if samplers_ok else None
        held_out = {"eval_before": self.eval_before, "eval_teacher": self.eval_teacher}
        if self.cfg.eval.before_after and interrupted_at is None and samplers_ok:
            held_out["eval_after"] = self._evaluate(self.actors.samplers[0])
        final = self.run_dir / "final"
        self.actors.learners.save_hf(str(final), self.prep.student_path)
        stats = self.guard.call("stats")
        summary = {
            "steps": self.step, "policy_version": self.version, "wall_s": self._elapsed(),
            "interrupted_at": interrupted_at, "recovered_requests": dict(self.recovered),
            "prompts_requested": self.prompts_requested, "skipped_overlong": self.prep.skipped_overlong,
            "buffer_restores": self.guard.restores, "buffer_rows_lost": self.guard.rows_lost,
            "learner_restarts": self.learner_restarts,
            "pairs_added": self.pairs_added, "buffer": stats,
            "sampler_versions": ray.get([s.version.remote() for s in self.actors.samplers]) if samplers_ok else [],
            "teachers": self.actors.teachers.stats(),
            "pairs_by_teacher": dict(self.pairs_by_teacher),
            "samplers": ray.get([s.stats.remote() for s in self.actors.samplers]) if samplers_ok else [],
            **({"lost_actors": lost} if lost else {}),
            "first_loss": self.log.first.get("loss"), "last_loss": self.log.last.get("loss"),
            "final_model": str(final),
            **self.last_eval, **{k: v for k, v in held_out.items() if v},
            "probe": {"prompt": self.prep.tokenizer.decode(self.prep.requests[0]["prompt_ids"]),
                      "before": self.probe_before, "after": probe_after},
        }
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        self.trackers.log_summary(summary)
        return summary

    def _count(self, added: dict[str, int]) -> None:
        for name, n in added.items():
            self.pairs_by_teacher[name] = self.pairs_by_teacher.get(name, 0) + n
            self.pairs_added += n

    def _drain(self, producer) -> None:
        """Wait for every request in flight (and any re-sent after a failure) to land. No learner
        consumes meanwhile, so the buffer may go over capacity instead of holding producers back."""
        if producer.pending():
            self.guard.set_overflow(True)
            while producer.pending():
                done, _ = ray.wait(producer.pending(), num_returns=1)
                self._count(producer.complete(done[0]))
            self.guard.set_overflow(False)
        self.prompts_requested += producer.taken
        producer.taken = 0
        if not isinstance(producer, Drained):
            self.drained_state = producer.state()

    def _train_step(self, producer, phase: PhaseConfig, bar) -> None:
        cfg, actors = self.cfg, self.actors
        started, metrics = time.perf_counter(), None
        while metrics is None:
            generation, sampled_at = self.guard.generation, self.version
            batch = actors.buffer.sample.remote(cfg.learner.batch_size, self.version)
            producer.took(cfg.learner.batch_size)
            train_ref = actors.learners.train_step(batch, phase.loss)
            while True:
                producer.top_up(self.version)
                pending = producer.pending()
                done, _ = ray.wait([train_ref, *pending], num_returns=1, timeout=None if pending else 1.0)
                if not done:  # paced and idle while the learner waits: the buffer may have dropped
                    producer.held(self.guard.call("stats")["unconsumed"])  # stale rows; count again
                    continue
                if done[0] != train_ref:
                    self._count(producer.complete(done[0]))
                    continue
                try:
                    metrics = ray.get(train_ref)
                except ray.exceptions.RayActorError:
                    if not all(answers(a) for a in actors.learners.learners):
                        raise LearnerDied(train_ref) from None  # the caller restarts the group
                    self.guard.lost(generation)  # the batch's buffer died; then take the step again
                break
        producer.stepped(metrics.get("train_step_s"))
        self.step += 1
        self.phase_step += 1
        if self.step % cfg.sync.every_steps == 0 and phase.kind == "online":
            self._push()
        stats = self.guard.check(self.guard.call("stats"))
        producer.held(stats["unconsumed"])
        batch_version = metrics.pop("batch_policy_version", None)
        row = {
            "step": self.step, "phase": self.phase_index, "phase_kind": phase.kind,
            "policy_version": self.version, **metrics,
            "policy_lag": sampled_at - batch_version if batch_version is not None and phase.kind == "online" else 0.0,
            "buffer_size": stats["size"], "buffer_dropped_stale": stats["dropped_stale"],
            **({"steps_ahead": producer.pace.steps} if isinstance(producer, OnlineProducer) else {}),
            "pairs_added": self.pairs_added, "samples_per_s": self.pairs_added / max(self._elapsed(), 1e-9),
            "step_time_s": time.perf_counter() - started, "weight_sync_s": self.sync_seconds,
            "elapsed_s": self._elapsed(),
        }
        if self.evaluator is not None and self.evaluator.due(self.step):
            if self.pushed_step != self.step:
                self._push()  # an offline phase (or an off-beat step) has not pushed these weights yet
            self.last_eval = self.evaluator.run(self._generate)  # sees the weights just pushed
            row.update(self.last_eval)
        record_step(row)
        self.log.write(row)
        self.trackers.log(self.log.last, self.step)
        bar.update(row)

    def _push(self) -> None:
        """The learner's weights to every sampler as the next policy version (after the last push)."""
        self.version += 1
        self.guard.version = self.version
        self.sync_seconds = self.sync.wait() or self.sync_seconds
        self.sync.push(self.version)
        self.pushed_step = self.step
        self.actors.buffer.set_version.remote(self.version)

    def _generate(self, prompts: list[list[int]], seed: int | None = None, actor=None) -> list[list[int]]:
        """``actor``'s (default sampler 0's) output for evaluation: greedy unless eval.seeds gives a seed.
        Actor calls run in submission order, so a sampler answers with the weights pushed before."""
        reqs = [{"prompt_ids": p} for p in prompts]
        gens = ray.get((actor or self.actors.samplers[0]).generate.remote(
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


def run_online(cfg: Config, prep: Prepared, progress: bool = True, resume: bool | Path = False,
               on_resumed=None) -> dict:
    """Run the whole schedule (the name is historical: offline phases run here too). ``resume``: the
    checkpoint to continue from (checked by ``driver.runs.plan_resume``), or True for the newest intact one;
    ``on_resumed()`` runs once it is restored, before any step (``driver.runs.commit_resume``)."""
    from driver.evaluate import PeriodicEval

    # built before any actor starts, so bad eval data fails fast
    wants_eval = cfg.eval.every_steps or cfg.eval.before_after or cfg.eval.teacher
    evaluator = PeriodicEval(cfg, prep.tokenizer) if wants_eval else None
    trackers = Trackers(cfg.run.report_to)  # (that they are installed was checked with the config)
    started_ray = start_ray(cfg)
    failed = True
    try:
        check_resources(cfg)
        actors = create_actors(cfg, prep.pools(), prep.student_path, prep.text_pools)
        try:
            trainer = Trainer(cfg, prep, actors, progress, evaluator, trackers)
            if resume:
                ckpt = resume if isinstance(resume, Path) else intact_checkpoint(prep.run_dir)
                if ckpt is None:
                    raise RunDirError(f"{prep.run_dir}/checkpoints: no intact checkpoint to resume from")
                trainer.restore(ckpt, faults=True)
                if on_resumed is not None:
                    on_resumed()
            trackers.start(cfg.to_dict(), prep.run_dir, resume_step=trainer.step if resume else None)
            summary = trainer.run()
            failed = False
            return summary
        finally:
            actors.shutdown()
    finally:
        trackers.finish(failed)
        if started_ray:
            ray.shutdown()
