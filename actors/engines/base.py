"""The inference-engine interface every backend implements (HF reference, vLLM).

An engine holds one model and answers three calls, all on token ids (tokenisation and chat templates
happen in the driver, once):

- ``generate(prompts, params)``: sample continuations; each comes back with the log-prob of every
  sampled token under the model's *raw* distribution (temperature 1, before top-p), which is what an
  importance ratio against the learner's log-probs needs, and optionally the raw top-k at each
  position. These equal what ``score`` would return for the same tokens, so a teacher never has to
  re-score its own output.
- ``score(prompts, continuations, top_k)``: teacher-forced log-prob of each given continuation token,
  plus the model's top-k (ids, log-probs) at each of those positions, also raw (temperature 1).
- ``update_weights(weights, version)``: load a new state dict in place; ``version`` is stamped on
  everything produced afterwards.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    top_k_logprobs: int = 0  # also return the raw top-k (ids, log-probs) at each generated position


@dataclass
class Generation:
    token_ids: list[int]
    logprobs: list[float]  # raw log-prob of each sampled token; len == len(token_ids)
    finish_reason: str  # "stop" (EOS) or "length"
    version: int
    topk_ids: list[list[int]] = field(default_factory=list)  # [len, k] when asked for, descending
    topk_logprobs: list[list[float]] = field(default_factory=list)


@dataclass
class Scores:
    logprobs: list[float]  # log p(token_i | prefix) for each continuation token
    topk_ids: list[list[int]] = field(default_factory=list)  # [len, k] (empty when top_k == 0)
    topk_logprobs: list[list[float]] = field(default_factory=list)  # [len, k], descending
    version: int = 0


class Engine(abc.ABC):
    """One model, one process. Not an actor itself: actors own an engine."""

    version: int = 0

    @abc.abstractmethod
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Generation]: ...

    @abc.abstractmethod
    def score(
        self, prompts: list[list[int]], continuations: list[list[int]], top_k: int = 0
    ) -> list[Scores]: ...

    @abc.abstractmethod
    def update_weights(self, weights: dict, version: int) -> None: ...
