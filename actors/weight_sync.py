"""Weight sync from the learner group to the student samplers.

CPU / small models: rank 0 gathers the full state dict, it lands in the Ray object store once (as
rank 0's return value), and every sampler loads it from there. Samplers report the version they run.
"""

from __future__ import annotations

import time

import ray


class WeightSync:
    def __init__(self, learner_group, samplers: list):
        self.group = learner_group
        self.samplers = samplers
        self.pending: list[ray.ObjectRef] = []
        self.started = 0.0
        self.last_seconds = 0.0

    def push(self, version: int) -> None:
        """Start pushing the learner's current weights as ``version`` (returns at once)."""
        self.wait()
        self.started = time.perf_counter()
        weights = self.group.weights_ref()
        self.pending = [s.update_weights.remote(weights, version) for s in self.samplers]

    def wait(self) -> float:
        """Block until the last push reached every sampler; its duration in seconds."""
        if self.pending:
            versions = ray.get(self.pending)
            self.last_seconds = time.perf_counter() - self.started
            self.pending = []
            if len(set(versions)) != 1:
                raise RuntimeError(f"samplers report different versions after a sync: {versions}")
        return self.last_seconds
