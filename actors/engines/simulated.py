"""The simulated engine: a measuring instrument for the orchestration, NOT a model.

``engine.backend: simulated`` (never a default; ``auto`` never picks it) answers the engine interface
with outputs of realistic *shapes* and *timing* and meaningless *content*:

- ``generate``: ``max_new_tokens`` random token ids per prompt (ids below the model's ``vocab_size``,
  read from ``config.json`` at the model path), a log-prob per token, and the top-k when asked;
  it returns ``latency_s + (tokens generated in the call) / tokens_per_s`` seconds after it was called;
- ``score``: a log-prob (and top-k) per continuation token, after ``latency_s + (tokens scored) /
  score_tokens_per_s`` seconds;
- ``update_weights``: takes a real state dict (the weight sync is part of what is measured), counts
  its parameters and bytes, and stamps the version.

The time the call spends building its output counts inside the delay (it sleeps only for what is
left), so a replica's rate is the configured one unless the machine cannot even build the outputs
that fast. ``tokens_per_s`` is a replica's aggregate rate over the whole batch of a call (as a
continuously batching server's throughput), not one sequence's decoding speed.

It exists so that ``benchmarks/scale.py`` can run tens of "GPU" replicas on a CPU box and see where
the driver, the replay buffer and the weight sync, rather than the GPUs, set the pace
(docs/scaling.md). Training on its output teaches nothing.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from actors.engines.base import Engine, Generation, SamplingParams, Scores


def _vocab_size(model_path: str | Path) -> int:
    cfg = Path(model_path) / "config.json"
    if not cfg.is_file():
        raise ValueError(f"simulated engine: {cfg} not found (it reads vocab_size from the model's config)")
    data = json.loads(cfg.read_text())
    vocab = data.get("vocab_size") or data.get("text_config", {}).get("vocab_size")
    if not vocab:
        raise ValueError(f"simulated engine: {cfg} has no vocab_size")
    return int(vocab)


class SimulatedEngine(Engine):
    def __init__(self, model_path: str | Path, tokens_per_s: float = 2000.0, score_tokens_per_s: float = 20000.0,
                 latency_s: float = 0.05, vocab_size: int | None = None, seed: int = 0, **ignored):
        if tokens_per_s <= 0 or score_tokens_per_s <= 0 or latency_s < 0:
            raise ValueError(f"simulated engine: tokens_per_s={tokens_per_s} and score_tokens_per_s="
                             f"{score_tokens_per_s} must be > 0, latency_s={latency_s} >= 0")
        self.vocab_size = int(vocab_size or _vocab_size(model_path))
        self.tokens_per_s, self.score_tokens_per_s, self.latency_s = tokens_per_s, score_tokens_per_s, latency_s
        self.rng = np.random.default_rng(seed)
        self.version = 0
        self.weight_updates = self.weight_params = self.weight_bytes = 0

    def _wait_until(self, deadline: float) -> None:
        left = deadline - time.perf_counter()
        if left > 0:
            time.sleep(left)

    def _positions(self, n: int, k: int):
        """(token ids [n], their log-probs [n], top-k ids [n, k], top-k log-probs [n, k] descending)."""
        ids = self.rng.integers(0, self.vocab_size, n)
        if k <= 0:
            return ids, -self.rng.exponential(1.0, n).astype(np.float32), None, None
        top_lp = -np.cumsum(self.rng.exponential(0.5, (n, k)), axis=1).astype(np.float32)
        # k distinct ids per position: consecutive ids from a random start, the sampled one first
        top_ids = (ids[:, None] + np.arange(k)[None, :]) % self.vocab_size
        return ids, top_lp[:, 0].copy(), top_ids, top_lp

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Generation]:
        start = time.perf_counter()
        n = params.max_new_tokens
        if params.seed is not None:
            self.rng = np.random.default_rng(params.seed)
        out = []
        for _ in prompts:
            ids, lps, top_ids, top_lps = self._positions(n, params.top_k_logprobs)
            g = Generation(ids.tolist(), lps.tolist(), "length", self.version)
            if top_ids is not None:
                g.topk_ids, g.topk_logprobs = top_ids.tolist(), top_lps.tolist()
            out.append(g)
        self._wait_until(start + self.latency_s + n * len(prompts) / self.tokens_per_s)
        return out

    def score(self, prompts: list[list[int]], continuations: list[list[int]], top_k: int = 0) -> list[Scores]:
        if len(prompts) != len(continuations):
            raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations")
        start = time.perf_counter()
        out = []
        for c in continuations:
            _, lps, top_ids, top_lps = self._positions(len(c), top_k)
            out.append(Scores(lps.tolist(), top_ids.tolist() if top_ids is not None else [],
                              top_lps.tolist() if top_lps is not None else [], self.version))
        tokens = sum(len(c) for c in continuations)
        self._wait_until(start + self.latency_s + tokens / self.score_tokens_per_s)
        return out

    def update_weights(self, weights: dict, version: int) -> None:
        if not isinstance(weights, dict) or not weights:
            raise ValueError("weight update: expected a non-empty state dict")
        self.weight_params = sum(int(t.numel()) for t in weights.values())
        self.weight_bytes = sum(int(t.numel()) * t.element_size() for t in weights.values())
        self.weight_updates += 1
        self.version = version
