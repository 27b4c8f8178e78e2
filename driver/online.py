"""The online loop: producers and the learner run at the same time and meet only in the buffer.

Producer chain, per request of ``sampler.prompts_per_request`` prompts (all ObjectRefs, nothing waits
in the driver):  sampler.generate -> teacher.make_pairs -> buffer.add.
Learner chain, per step:  buffer.sample -> learner.train_step; every ``sync.every_steps`` steps the
learner's weights go to every sampler and the policy version goes up.

The driver only keeps both chains full and records what comes back.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import ray

from driver.cluster import check_resources, create_actors, start_ray
from driver.config import Config
from driver.monitoring import MetricsLog, ProgressBar
from driver.prepare import Prepared


class PromptStream:
    """Cycles through the prompts, reshuffled each epoch (seeded); counts what it handed out."""

    def __init__(self, requests: list[dict], seed: int):
        self.requests = requests
        self.rng = random.Random(seed)
        self.order: list[int] = []
        self.taken = 0
        self.epoch = -1

    def take(self, n: int) -> list[dict]:
        out = []
        while len(out) < n:
            if not self.order:
                self.epoch += 1
                self.order = list(range(len(self.requests)))
                self.rng.shuffle(self.order)
            out.append(self.requests[self.order.pop()])
        self.taken += n
        return out


def _probe(actors, prep: Prepared) -> str:
    """Sampler 0's greedy answer to the first prompt: shows (and tests) that new weights arrived."""
    gen = ray.get(actors.samplers[0].generate.remote(prep.requests[:1], greedy=True))[0]
    return prep.tokenizer.decode(gen.token_ids)


def run_online(cfg: Config, prep: Prepared, progress: bool = True) -> dict:
    started_ray = start_ray(cfg)
    try:
        check_resources(cfg)
        actors = create_actors(cfg, prep.teacher_path, prep.student_path)
        try:
            return _loop(cfg, prep, actors, progress)
        finally:
            actors.shutdown()
    finally:
        if started_ray:
            ray.shutdown()


def _loop(cfg: Config, prep: Prepared, actors, progress: bool) -> dict:
    from actors.weight_sync import WeightSync

    stream = PromptStream(prep.requests, cfg.run.seed)
    sync = WeightSync(actors.learners, actors.samplers)
    log = MetricsLog(prep.run_dir / "metrics.jsonl")
    bar = ProgressBar(cfg.learner.max_steps, enabled=progress)
    in_flight: dict[ray.ObjectRef, tuple[int, ray.ObjectRef]] = {}  # add ref -> (sampler, pair ref)
    per_sampler = [0] * len(actors.samplers)
    version, step, pairs_added, requests_sent = 0, 0, 0, 0
    probe_before = _probe(actors, prep)
    t0 = time.perf_counter()
    train_ref, step_started = None, t0
    sync_seconds = 0.0

    while step < cfg.learner.max_steps:
        for i, sampler in enumerate(actors.samplers):  # keep every producer busy
            while per_sampler[i] < cfg.sampler.max_in_flight:
                reqs = stream.take(cfg.sampler.prompts_per_request)
                gen = sampler.generate.remote(reqs, seed=cfg.run.seed * 1_000_003 + requests_sent)
                pair = actors.teachers.submit(reqs, gen)
                in_flight[actors.buffer.add.remote(pair)] = (i, pair)
                per_sampler[i] += 1
                requests_sent += 1
        if train_ref is None:
            batch = actors.buffer.sample.remote(cfg.learner.batch_size, version)
            train_ref, step_started = actors.learners.train_step(batch), time.perf_counter()
            sampled_at_version = version

        done, _ = ray.wait([train_ref, *in_flight], num_returns=1)
        for ref in done:
            if ref in in_flight:
                i, pair = in_flight.pop(ref)
                pairs_added += ray.get(ref)  # raises the producer's error, if any
                actors.teachers.done(pair)
                per_sampler[i] -= 1
                continue
            metrics = ray.get(train_ref)
            train_ref = None
            step += 1
            if step % cfg.sync.every_steps == 0:
                version += 1
                sync_seconds = sync.wait()
                sync.push(version)
                actors.buffer.set_version.remote(version)
            stats = ray.get(actors.buffer.stats.remote())
            elapsed = time.perf_counter() - t0
            row = {
                "step": step,
                "policy_version": version,
                **metrics,
                "policy_lag": sampled_at_version - metrics.pop("batch_policy_version"),
                "buffer_size": stats["size"],
                "buffer_dropped_stale": stats["dropped_stale"],
                "pairs_added": pairs_added,
                "samples_per_s": pairs_added / elapsed,
                "step_time_s": time.perf_counter() - step_started,
                "weight_sync_s": sync_seconds,
                "elapsed_s": elapsed,
            }
            log.write(row)
            bar.update(row)
    bar.close()
    if step % cfg.sync.every_steps:  # the samplers end on the final weights too
        version += 1
        sync.push(version)
    sync.wait()
    probe_after = _probe(actors, prep)
    final = prep.run_dir / "final"
    actors.learners.save_hf(str(final), prep.student_path)
    stats = ray.get(actors.buffer.stats.remote())
    ray.get(actors.buffer.close.remote())
    summary = {
        "steps": step,
        "policy_version": version,
        "wall_s": time.perf_counter() - t0,
        "pairs_added": pairs_added,
        "prompts_sent": stream.taken,
        "prompt_epochs": stream.epoch + 1,
        "buffer": stats,
        "sampler_versions": ray.get([s.version.remote() for s in actors.samplers]),
        "first_loss": log.first.get("loss"),
        "last_loss": log.last.get("loss"),
        "final_model": str(final),
        "probe": {"prompt": prep.tokenizer.decode(prep.requests[0]["prompt_ids"]),
                  "before": probe_before, "after": probe_after},
    }
    Path(prep.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary
