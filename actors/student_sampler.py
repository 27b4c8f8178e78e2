"""StudentSampler: a replica of the student that samples y_s on-policy with the current weights.

It reports the policy version it runs on every output, so the buffer can bound policy lag.
"""

from __future__ import annotations

import time
from dataclasses import replace

from actors import metrics
from actors.engines import Generation, SamplingParams, make_engine


class StudentSampler:
    """Ray actor (named ``sampler-<i>``). ``requests`` are dicts with at least ``prompt_ids``."""

    def __init__(self, index: int, model_path: str, backend: str, engine_opts: dict, sampling: dict):
        self.index = index
        self.engine = make_engine(backend, model_path, **engine_opts)
        self.params = SamplingParams(**sampling)
        self.generated = 0
        self.busy_s = 0.0

    def ready(self) -> int:
        return self.engine.version

    def generate(self, requests: list[dict], seed: int | None = None, greedy: bool = False,
                 max_new_tokens: int | None = None) -> list[Generation]:
        t = time.perf_counter()
        params = replace(self.params, seed=seed, temperature=0.0 if greedy else self.params.temperature,
                         max_new_tokens=max_new_tokens or self.params.max_new_tokens)
        gens = self.engine.generate([r["prompt_ids"] for r in requests], params)
        self.generated += len(gens)
        self.busy_s += time.perf_counter() - t
        metrics.record_generation(f"sampler-{self.index}", len(gens), sum(len(g.token_ids) for g in gens),
                                  time.perf_counter() - t)
        return gens

    def update_weights(self, weights: dict, version: int) -> int:
        self.engine.update_weights(weights, version)
        return version

    def version(self) -> int:
        return self.engine.version

    def stats(self) -> dict:
        return {"index": self.index, "version": self.engine.version, "generated": self.generated,
                "busy_s": self.busy_s}
