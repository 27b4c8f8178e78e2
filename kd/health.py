"""Distillation health metrics: signals, per training step, that a run is going wrong early.

Computed from what a step already has (the replay-buffer rows and the student logits of the learner's
forward), under ``torch.no_grad``; nothing here changes the loss. The learner adds them to the step's
metrics (``metrics.jsonl``, the progress bar, Ray metrics, ``raykd report``); see docs/monitoring.md.

Every metric is a mean, and every function returns it as ``{name: (sum, count)}`` so that micro-batches
and learner ranks add up exactly (the learner divides the totals at the end). A metric with nothing to
count (no top-k stored, no reference answers, no student samples) is left out rather than reported as 0.

On the tokens the loss trained on (``token_health``), each response position counted once per sequence
the student's forward covered (y_t, y_s or both, as the loss reads them):

* ``top1_agreement``: share of positions where the student's argmax is the teacher's top-1 id;
* ``topk_overlap``: ``|student top-k ∩ teacher top-k| / k`` with k the stored teacher top-k;
* ``student_entropy``: the student's ``-Σ_v q(v) log q(v)`` in nats (temperature 1).

The two top-k ones only where the row has the teacher's top-k for that side.

From the rows alone (``row_health``):

* ``teacher_topk_mass``: ``Σ_i exp(topk_logp_i)`` per position, the teacher probability the stored
  top-k covers (1 - this is the tail the top-k losses lump into one bucket), over every stored
  position of y_t and y_s;
* ``y_t_len`` / ``y_s_len``: mean response length in tokens (rows that have the response);
* ``y_t_truncated`` / ``y_s_truncated``: share of responses that ran into their ``max_new_tokens``
  budget: at least that many tokens and not ending in EOS (the engines' ``finish_reason == "length"``);
* ``y_t_exact_match`` / ``y_s_exact_match``: ``kd.metrics.exact_match`` of the decoded response
  against the row's ``reference_answer``, over the rows whose reference has a number.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

Sums = dict[str, tuple[float, float]]

SIDES = {"chosen": "y_t", "rejected": "y_s"}

_CHUNK = 128  # positions per chunk: bounds the [chunk, V] temporaries (see kd/losses.py on the size)


def add(into: Sums, more: Sums) -> Sums:
    """Add ``more``'s sums and counts into ``into`` (in place); returns ``into``."""
    for k, (s, c) in more.items():
        s0, c0 = into.get(k, (0.0, 0.0))
        into[k] = (s0 + s, c0 + c)
    return into


def means(sums: Sums) -> dict[str, float]:
    return {k: s / c for k, (s, c) in sums.items() if c > 0}


@torch.no_grad()
def token_health(logits: torch.Tensor, mask: torch.Tensor, topk_ids: torch.Tensor | None = None,
                 topk_logps: torch.Tensor | None = None, topk_mask: torch.Tensor | None = None) -> Sums:
    """Student/teacher agreement and student entropy over the positions ``mask`` selects.

    ``logits [B, T, V]`` the student's, aligned with ``mask [B, T]``; ``topk_ids`` / ``topk_logps``
    ``[B, T, k]`` the teacher's stored top-k at the same positions (or None), ``topk_mask [B, T]`` where
    they exist (default: ``mask``)."""
    sel = mask.reshape(-1) > 0
    if not bool(sel.any()):
        return {}
    V = logits.shape[-1]
    flat = logits.reshape(-1, V)
    pos = sel.nonzero().squeeze(-1)
    has_topk = topk_ids is not None and topk_ids.shape[-1] > 0
    if has_topk:
        k = topk_ids.shape[-1]
        tmask = (mask if topk_mask is None else topk_mask * mask).reshape(-1)[pos] > 0
        t_ids = topk_ids.reshape(-1, k)[pos]
        t_top1 = t_ids.gather(-1, topk_logps.reshape(-1, k)[pos].argmax(-1, keepdim=True)).squeeze(-1)
    entropy = agree = overlap = 0.0
    n_topk = 0
    for lo in range(0, len(pos), _CHUNK):
        x = flat[pos[lo:lo + _CHUNK]].float()
        logq = x.log_softmax(-1)
        # -sum_v q log q as one batched dot product per position (no [chunk, V] product temporary)
        entropy -= float(torch.bmm(logq.exp().unsqueeze(1), logq.unsqueeze(2)).sum())
        if has_topk:
            m = tmask[lo:lo + _CHUNK]
            if not bool(m.any()):
                continue
            ids = t_ids[lo:lo + _CHUNK][m]
            s_top = (x if bool(m.all()) else x[m]).topk(min(k, V), dim=-1).indices
            agree += float((s_top[:, 0] == t_top1[lo:lo + _CHUNK][m]).sum())
            overlap += float((s_top.unsqueeze(-1) == ids.unsqueeze(-2)).any(-1).sum()) / k
            n_topk += int(m.sum())
    out: Sums = {"student_entropy": (entropy, float(len(pos)))}
    if n_topk:
        out.update(top1_agreement=(agree, float(n_topk)), topk_overlap=(overlap, float(n_topk)))
    return out


def _truncated(ids: list[int], budget: int | None, eos_id: int | None) -> bool:
    return budget is not None and len(ids) >= budget and (eos_id is None or ids[-1] != eos_id)


def row_health(table: pa.Table, budgets: dict[str, int] | None = None, eos_id: int | None = None,
               decode: Callable[[list[int]], str] | None = None) -> Sums:
    """Metrics of the rows themselves (no student forward): teacher top-k mass, response lengths, the
    share hitting the length budget, exact match against the reference answers.

    ``budgets``: ``{"chosen": teacher.max_new_tokens, "rejected": sampler.max_new_tokens}`` (a side
    left out is not checked); ``decode``: token ids -> text (without it, no exact match)."""
    from kd.metrics import exact_match

    budgets = budgets or {}
    refs = table.column("reference_answer").to_pylist()
    out: Sums = {}
    mass, n_mass = 0.0, 0
    for side, name in SIDES.items():
        responses = table.column(f"{side}_ids").to_pylist()
        have = [i for i, r in enumerate(responses) if r]  # an empty response: this row has none
        positions = pc.list_flatten(table.column(f"{side}_topk_logps"))  # one list per position
        if len(positions):
            n_mass += int(pc.sum(pc.greater(pc.list_value_length(positions), 0)).as_py() or 0)
            values = pc.list_flatten(positions).to_numpy(zero_copy_only=False).astype(np.float64)
            mass += float(np.exp(values).sum())
        if not have:
            continue
        n = float(len(have))
        out[f"{name}_len"] = (float(sum(len(responses[i]) for i in have)), n)
        if side in budgets:
            out[f"{name}_truncated"] = (float(sum(_truncated(responses[i], budgets[side], eos_id)
                                                  for i in have)), n)
        if decode is not None:
            scored = [exact_match(decode(responses[i]), refs[i]) for i in have if refs[i]]
            scored = [s for s in scored if s is not None]
            if scored:
                out[f"{name}_exact_match"] = (float(sum(scored)), float(len(scored)))
    if n_mass:
        out["teacher_topk_mass"] = (mass, float(n_mass))
    return out
