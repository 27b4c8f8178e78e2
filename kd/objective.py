"""From replay-buffer rows to a scalar loss: batching, the student forward, and ``loss.type`` dispatch.

Pure library (torch, pyarrow): the learner actor wraps it in DeepSpeed; tests call it directly.

The objective is ``kd_coef * main + sft_coef * CE(y_t)``: ``main`` is the method's own term
(``loss.type``), ``CE(y_t)`` cross-entropy on the teacher's response. For the token-level divergences
``student_ratio`` is the probability that a row's divergence is computed on the student's sample y_s
rather than the teacher's y_t (GKD's lambda), drawn per row from a stable hash. ``None`` in a
``LossConfig`` means the method's default from ``METHOD_DEFAULTS``; ``resolve_loss`` fills them in
(config validation does, so the run's config.yaml shows numbers). See docs/losses.md.

Layout of a batch: prompts are LEFT-padded to a common width P and responses RIGHT-padded to a common
width R, so every response starts at column P. The student's logits for the response tokens are then
the slice ``[:, P-1 : P-1+R]`` for every row, computed with ``logits_to_keep`` (no [B, P+R, V] tensor).

Data-parallel normalisation: every count used as a denominator (pairs, tokens) is the GLOBAL count
over all learner ranks, and the loss is multiplied by the world size because DeepSpeed averages
gradients over ranks; K ranks then take the same step as one rank on the whole batch.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass

import pyarrow as pa
import torch

from kd import losses as L


@dataclass
class Seqs:
    input_ids: torch.Tensor  # [B, P+R]
    attention_mask: torch.Tensor  # [B, P+R]
    position_ids: torch.Tensor  # [B, P+R]
    resp_ids: torch.Tensor  # [B, R]
    resp_mask: torch.Tensor  # [B, R] float
    prompt_width: int  # P


def pack(prompts: list[list[int]], responses: list[list[int]], pad_id: int) -> Seqs:
    P = max(len(p) for p in prompts)
    R = max(1, max(len(r) for r in responses))
    B = len(prompts)
    ids = torch.full((B, P + R), pad_id, dtype=torch.long)
    attn = torch.zeros((B, P + R), dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        ids[i, P - len(p) : P] = torch.tensor(p, dtype=torch.long)
        ids[i, P : P + len(r)] = torch.tensor(r, dtype=torch.long)
        attn[i, P - len(p) : P + len(r)] = 1
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    resp_mask = attn[:, P:].float()
    return Seqs(ids, attn, pos, ids[:, P:], resp_mask, P)


def pad_2d(rows: list[list[float]], width: int, value: float = 0.0) -> torch.Tensor:
    out = torch.full((len(rows), width), value, dtype=torch.float32)
    for i, r in enumerate(rows):
        if r:
            out[i, : len(r)] = torch.tensor(r, dtype=torch.float32)
    return out


def pad_topk(rows: list, width: int, k: int, dtype, value) -> torch.Tensor:
    out = torch.full((len(rows), width, k), value, dtype=dtype)
    for i, r in enumerate(rows):
        if r:
            out[i, : len(r)] = torch.tensor(r, dtype=dtype)
    return out


def topk_teacher(table: pa.Table, side: str, width: int, tail: str = "uniform") -> L.TopK:
    ids = table.column(f"{side}_topk_ids").to_pylist()
    lps = table.column(f"{side}_topk_logps").to_pylist()
    k = next((len(r[0]) for r in ids if r), 0)
    if k == 0:
        raise ValueError(f"loss needs the teacher's top-k on '{side}' responses, but the rows have none "
                         "(set teacher.top_k_logprobs > 0)")
    # Padding positions are masked out of every loss; id 0 / log-prob 0 there is never read.
    return L.TopK(pad_topk(ids, width, k, torch.long, 0), pad_topk(lps, width, k, torch.float32, 0.0), tail)


def response_logits(model, seqs: Seqs) -> torch.Tensor:
    """Student logits [B, R, V] predicting each response token."""
    P, R = seqs.prompt_width, seqs.resp_ids.shape[1]
    keep = torch.arange(P - 1, P - 1 + R)
    out = model(input_ids=seqs.input_ids, attention_mask=seqs.attention_mask,
                position_ids=seqs.position_ids, logits_to_keep=keep, use_cache=False)
    return out.logits


def paired_response_logits(model, seqs: Seqs) -> torch.Tensor:
    """``response_logits`` for rows that come in pairs with the same prompt (rows 2i and 2i+1: y_t and
    y_s of one buffer row), with each prompt run once. The prompt's first P-1 columns go through the
    model once per pair (their keys and values, with their gradient, are repeated for both rows of
    the pair); the last prompt token and the responses then run per row on that cache. The prompt's
    share of the body's work is halved; the logits are those of ``response_logits`` (the same
    positions and attention), up to float rounding."""
    from transformers import DynamicCache

    P, R = seqs.prompt_width, seqs.resp_ids.shape[1]
    if P < 2:
        return response_logits(model, seqs)
    cache = DynamicCache()
    model(input_ids=seqs.input_ids[0::2, :P - 1], attention_mask=seqs.attention_mask[0::2, :P - 1],
          position_ids=seqs.position_ids[0::2, :P - 1], past_key_values=cache, use_cache=True,
          logits_to_keep=1)  # (one position's logits: the prompt's are not read)
    cache.batch_repeat_interleave(2)
    out = model(input_ids=seqs.input_ids[:, P - 1:P - 1 + R], attention_mask=seqs.attention_mask[:, :P - 1 + R],
                position_ids=seqs.position_ids[:, P - 1:P - 1 + R], past_key_values=cache, use_cache=True)
    return out.logits


def token_logps(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    logits = logits.float()
    return logits.gather(-1, ids.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)


# --------------------------------------------------------------------------------------------------
# What each method optimises, and on which sequences
# --------------------------------------------------------------------------------------------------

# loss.type -> default (kd_coef, sft_coef, student_ratio). student_ratio is None where the method fixes
# its sequences (dpkd: y_t and y_s; dpkd_token, sft: y_t; pg_rkl: y_s). See docs/losses.md for sources.
METHOD_DEFAULTS: dict[str, dict] = {
    "dpkd": {"kd_coef": 0.5, "sft_coef": 0.5, "student_ratio": None},  # LMOps dpkd/: kd_ratio 0.5
    "dpkd_token": {"kd_coef": 0.5, "sft_coef": 0.5, "student_ratio": None},
    "fkl": {"kd_coef": 1.0, "sft_coef": 0.0, "student_ratio": 0.0},  # supervised KD on teacher text
    "rkl": {"kd_coef": 1.0, "sft_coef": 0.0, "student_ratio": 1.0},  # GKD on-policy
    "jsd": {"kd_coef": 1.0, "sft_coef": 0.0, "student_ratio": 1.0},
    "skew_fkl": {"kd_coef": 1.0, "sft_coef": 0.0, "student_ratio": 1.0},
    "skew_rkl": {"kd_coef": 1.0, "sft_coef": 0.0, "student_ratio": 1.0},
    "tvd": {"kd_coef": 1.0, "sft_coef": 0.0, "student_ratio": 1.0},
    "sft": {"kd_coef": 0.0, "sft_coef": 1.0, "student_ratio": None},
    "pg_rkl": {"kd_coef": 1.0, "sft_coef": 0.0, "student_ratio": None},
}
assert set(METHOD_DEFAULTS) == set(L.LOSS_TYPES)


def resolve_loss(cfg):
    """``cfg`` (a ``LossConfig``) with every ``None`` weight / ratio replaced by the method's default.
    Idempotent. A ``student_ratio`` set for a method that fixes its sequences is a ValueError."""
    if cfg.type not in METHOD_DEFAULTS:
        raise ValueError(f"unknown loss.type {cfg.type!r}; allowed: {', '.join(METHOD_DEFAULTS)}")
    if cfg.type not in L.DIVERGENCES and cfg.student_ratio is not None:
        raise ValueError(f"loss.student_ratio is for the token-level divergences only; {cfg.type} fixes its "
                         "sequences")
    defaults = METHOD_DEFAULTS[cfg.type]
    return dataclasses.replace(cfg, **{k: v if getattr(cfg, k) is None else getattr(cfg, k)
                                       for k, v in defaults.items()})


def loss_needs(cfg) -> dict:
    """What the rows must carry for this loss (``cfg`` resolved or not): ``y_t`` the teacher's response,
    ``teacher_scores_y_t`` the teacher's log-probs / top-k of it, ``y_s`` the student's sample,
    ``teacher_scores_y_s`` the teacher's log-probs / top-k of y_s, ``teacher_topk`` whether those
    scores must include the top-k (else the per-token log-probs suffice)."""
    cfg = resolve_loss(cfg)
    kd, kind = cfg.kd_coef > 0, cfg.type
    div = kind in L.DIVERGENCES
    kd_on_t = kd and (kind in ("dpkd", "dpkd_token") or (div and cfg.student_ratio < 1))
    kd_on_s = kd and (kind in ("dpkd", "pg_rkl") or (div and cfg.student_ratio > 0))
    return {"y_t": kd_on_t or cfg.sft_coef > 0, "teacher_scores_y_t": kd_on_t, "y_s": kd_on_s,
            "teacher_scores_y_s": kd_on_s, "teacher_topk": kd and (div or kind == "dpkd_token")}


def row_uniform(prompt_id: str, created_at) -> float:
    """A stable draw in [0, 1) for a row: the same on every rank, micro-batch and restart."""
    digest = hashlib.blake2b(f"{prompt_id}\x00{created_at!r}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def student_rows(table: pa.Table, cfg) -> list[bool]:
    """Per row, whether ``cfg``'s divergence is computed on y_s (True) or y_t: ``u < student_ratio``,
    so exactly none at 0 and all at 1. All False for non-divergences."""
    cfg = resolve_loss(cfg)
    if cfg.type not in L.DIVERGENCES:
        return [False] * table.num_rows
    ratio = cfg.student_ratio
    if ratio in (0.0, 1.0):
        return [ratio == 1.0] * table.num_rows
    return [row_uniform(p, c) < ratio for p, c in zip(table.column("prompt_id").to_pylist(),
                                                       table.column("created_at").to_pylist())]


def token_counts(table: pa.Table, cfg) -> dict:
    """This table's denominators: ``pairs`` (rows), ``chosen`` / ``rejected`` (tokens of y_t / y_s) and
    ``divergence`` (tokens of the sequence each row's divergence uses). The learner all-reduces them, so
    compute_loss normalises by the whole step's counts on every rank."""
    chosen = [len(r) for r in table.column("chosen_ids").to_pylist()]
    rejected = [len(r) for r in table.column("rejected_ids").to_pylist()]
    on_s = student_rows(table, cfg)
    return {"pairs": table.num_rows, "chosen": sum(chosen), "rejected": sum(rejected),
            "divergence": sum(r if s else c for c, r, s in zip(chosen, rejected, on_s))}


def _rows_without_student(table: pa.Table, rows: list[int]) -> list[int]:
    """Rows (of ``rows``) that carry no student sample: offline rows (policy_version -1, no y_s)."""
    versions = table.column("policy_version").to_pylist()
    rejected = table.column("rejected_ids").to_pylist()
    return [i for i in rows if versions[i] < 0 and not rejected[i]]


# --------------------------------------------------------------------------------------------------
# The loss
# --------------------------------------------------------------------------------------------------


class _Forward:
    """One student forward over the sequences the loss reads: ``rows[side]`` (table row indices) of y_t
    ("chosen") and y_s ("rejected"), packed together; ``take`` slices a side's rows back out."""

    def __init__(self, model, table: pa.Table, rows: dict[str, list[int]], pad_id: int, pair_prompts: bool = True):
        prompts = table.column("prompt_ids").to_pylist()
        # both sides of the same rows (dpkd): y_t and y_s of a row share their prompt's forward
        paired = pair_prompts and bool(rows["chosen"]) and rows["chosen"] == rows["rejected"]
        if paired:  # y_t and y_s of a row side by side: their prompt runs once (paired_response_logits)
            order = [(s, i) for i in rows["chosen"] for s in ("chosen", "rejected")]
        else:
            order = [(s, i) for s in ("chosen", "rejected") for i in rows[s]]
        resp = {s: table.column(f"{s}_ids").to_pylist() for s in ("chosen", "rejected") if rows[s]}
        seqs = pack([prompts[i] for _, i in order], [resp[s][i] for s, i in order], pad_id)
        self.logits = (paired_response_logits if paired else response_logits)(model, seqs)
        self.ids, self.mask, self.width = seqs.resp_ids, seqs.resp_mask, seqs.resp_ids.shape[1]
        self.pos = {s: {} for s in rows}
        for j, (s, i) in enumerate(order):
            self.pos[s][i] = j
        # metric -> (numerator [n], denominator [n]) per table row, detached: what the terms computed
        # row by row, for the per-teacher split (compute_loss's by_teacher)
        self.per_row: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.y_t_ce: tuple[torch.Tensor, torch.Tensor] | None = None  # dpkd's, for sft_loss per pool
        self._logps: torch.Tensor | None = None  # [n, R] token log-probs of every packed sequence

    def _select(self, side: str, rows):
        idx = [self.pos[side][i] for i in rows]
        step = idx[1] - idx[0] if len(idx) > 1 else 1
        if step > 0 and idx == list(range(idx[0], idx[0] + step * len(idx), step)):
            return slice(idx[0], idx[0] + step * len(idx), step)  # a view: no copy of [n, R, V] logits
        return torch.tensor(idx)

    def take(self, side: str, rows) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        sel = self._select(side, rows)
        return self.logits[sel], self.ids[sel], self.mask[sel]

    @property
    def has_logps(self) -> bool:
        return self._logps is not None

    def take_logps(self, side: str, rows) -> tuple[torch.Tensor, torch.Tensor]:
        """The student's log-prob of each response token ``[len(rows), R]`` and the mask. One
        log-softmax over every packed sequence, shared by the terms that read token log-probs: slicing
        the [n, R] result, not the [n, R, V] logits, keeps backward from filling a zero gradient of
        the whole logits tensor per slice."""
        if self._logps is None:
            self._logps = token_logps(self.logits, self.ids)
        sel = self._select(side, rows)
        return self._logps[sel], self.mask[sel]

    def zero(self) -> torch.Tensor:
        """A 0 connected to the graph, so backward works even when every term skipped its rows."""
        return self.logits[:0].float().sum()


def _teacher_logp_sums(table: pa.Table, side: str, width: int, mask: torch.Tensor) -> torch.Tensor:
    """Per row, the sum of the teacher's per-token log-probs of ``side``; each token floored first (as the
    divergences floor), so a -inf log-prob gives a finite sum and reward. A row from the text path
    carries the sum itself (``{side}_teacher_logp_sum``: the teacher's log-prob of the same text under
    its own tokenizer, floored the same way by the teacher actor), which is taken as it is."""
    lps = pad_2d(table.column(f"{side}_teacher_logps").to_pylist(), width).clamp(min=L._LOG_TINY)
    sums = torch.where(mask > 0, lps, 0.0).sum(-1)
    given = table.column(f"{side}_teacher_logp_sum").to_pylist()
    if any(v is not None for v in given):
        sums = torch.tensor([s if v is None else v for s, v in zip(sums.tolist(), given)], dtype=sums.dtype)
    return sums


def text_path_rows(table: pa.Table) -> int:
    """How many rows come from the text path (a teacher with another tokenizer: docs/teachers.md)."""
    import pyarrow.compute as pc

    given = pc.or_(*(table.column(f"{s}_teacher_logp_sum").is_valid() for s in ("chosen", "rejected")))
    return int(pc.sum(given).as_py() or 0)


def _dpkd_term(fwd: _Forward, table, cfg, counts, metrics) -> torch.Tensor:
    every = range(table.num_rows)
    (lpc, mc), (lpr, mr) = fwd.take_logps("chosen", every), fwd.take_logps("rejected", every)
    pc, pr = (lpc * mc).sum(-1), (lpr * mr).sum(-1)
    ref_c = _teacher_logp_sums(table, "chosen", fwd.width, mc)
    ref_r = _teacher_logp_sums(table, "rejected", fwd.width, mr)
    main, cr, rr = L.dpkd_loss(pc, pr, ref_c, ref_r, mc.sum(-1), mr.sum(-1), beta=cfg.beta,
                               label_smoothing=cfg.label_smoothing, length_normalize=cfg.length_normalize)
    with torch.no_grad():
        rows = {"chosen_reward": cr, "rejected_reward": rr, "reward_margin": cr - rr,
                "reward_accuracy": (cr > rr).float(),
                "chosen_logratio": (pc - ref_c) / mc.sum(-1).clamp(min=1),
                "rejected_logratio": (pr - ref_r) / mr.sum(-1).clamp(min=1)}
        metrics["dpkd_loss"] = main.item()
        metrics.update({k: v.mean().item() for k, v in rows.items()})
        ones = torch.ones_like(cr)
        fwd.per_row.update({k: (v.detach(), ones) for k, v in rows.items()})
        fwd.y_t_ce = (-pc.detach(), mc.sum(-1).to(pc.dtype))  # CE of y_t per row and its tokens: for free
    return main * (table.num_rows / counts["pairs"])  # a mean over the step's pairs, not this part's


def _dpkd_token_term(fwd: _Forward, table, cfg, counts, metrics) -> torch.Tensor:
    lc, _, mc = fwd.take("chosen", range(table.num_rows))
    main = L.dpkd_token_loss(lc, topk_teacher(table, "chosen", fwd.width), mc, beta=cfg.beta,
                             num_tokens=counts["chosen"])
    metrics["dpkd_token_loss"] = main.item()
    return main


def _divergence_term(fwd: _Forward, table, cfg, counts, metrics, on_s: list[bool]) -> torch.Tensor:
    """The divergence over every row's selected sequence, each with its own side's teacher top-k, as one
    token mean: both sides divide by the step's ``divergence`` token count."""
    fn = L.get_divergence(cfg.type)
    kwargs = {"beta": cfg.jsd_beta} if cfg.type == "jsd" else (
        {"alpha": cfg.skew_alpha} if cfg.type.startswith("skew") else {})
    main = fwd.zero()
    for side, pick in (("chosen", False), ("rejected", True)):
        rows = [i for i, s in enumerate(on_s) if s == pick]
        if not rows:
            continue
        lx, _, mx = fwd.take(side, rows)
        if mx.sum() == 0:  # only empty responses: nothing to read, and no top-k to find
            continue
        teacher = topk_teacher(table.take(rows), side, fwd.width, cfg.topk_tail)
        main = main + fn(lx, teacher, mx, temperature=cfg.temperature, num_tokens=counts["divergence"], **kwargs)
    metrics[f"{cfg.type}_loss"] = main.item()
    metrics["student_rows"] = sum(on_s) / max(len(on_s), 1)
    return main


def _pg_term(fwd: _Forward, table, cfg, counts, metrics) -> torch.Tensor:
    """On-policy reverse KL on y_s: per token where the teacher scored each student token, per
    sequence for rows of the text path (a teacher with another tokenizer gives one log-prob of y_s's
    text: ``L.sequence_reverse_kl_policy_gradient``). Both over the step's y_s token count."""
    student, mr = fwd.take_logps("rejected", range(table.num_rows))
    behaviour = pad_2d(table.column("rejected_behaviour_logps").to_pylist(), fwd.width)
    sums = table.column("rejected_teacher_logp_sum").to_pylist()
    parts = []  # (loss, stats, live tokens) of the per-token rows and of the text-path rows
    token_rows = torch.tensor([i for i, v in enumerate(sums) if v is None], dtype=torch.long)
    text_rows = torch.tensor([i for i, v in enumerate(sums) if v is not None], dtype=torch.long)
    if len(token_rows):
        teacher = pad_2d(table.take(token_rows.tolist()).column("rejected_teacher_logps").to_pylist(), fwd.width)
        parts.append((*L.reverse_kl_policy_gradient(student[token_rows], behaviour[token_rows], teacher,
                                                    mr[token_rows], num_tokens=counts["rejected"]),
                      mr[token_rows].sum()))
    if len(text_rows):
        seq = torch.tensor([sums[i] for i in text_rows.tolist()], dtype=student.dtype)
        parts.append((*L.sequence_reverse_kl_policy_gradient(student[text_rows], behaviour[text_rows], seq,
                                                             mr[text_rows], num_tokens=counts["rejected"]),
                      mr[text_rows].sum()))
    main = sum(p[0] for p in parts)
    live = sum(float(p[2]) for p in parts) or 1.0
    stats = {k: sum(float(p[1][k]) * float(p[2]) for p in parts) / live for k in parts[0][1]}
    metrics.update(pg_loss=main.item(), **stats)
    return main


def _main_rows(cfg, n: int, on_s: list[bool]) -> dict[str, list[int]]:
    """Rows of y_t and y_s that the main (kd) term reads."""
    every = list(range(n))
    if cfg.kd_coef == 0:
        return {"chosen": [], "rejected": []}
    if cfg.type in L.DIVERGENCES:
        return {"chosen": [i for i in every if not on_s[i]], "rejected": [i for i in every if on_s[i]]}
    return {"chosen": every if cfg.type in ("dpkd", "dpkd_token") else [],
            "rejected": every if cfg.type in ("dpkd", "pg_rkl") else []}


def teacher_pools(table: pa.Table) -> list[str]:
    """The teacher pools (``teacher_name``, null left out) the rows come from, sorted."""
    if "teacher_name" not in table.column_names:
        return []
    return sorted(n for n in table.column("teacher_name").unique().to_pylist() if n is not None)


def compute_loss(model, table: pa.Table, cfg, pad_id: int, counts: dict | None = None,
                 world_size: int = 1, health: dict | None = None,
                 by_teacher: dict | None = None, pair_prompts: bool = True) -> tuple[torch.Tensor, dict]:
    """``kd_coef * main + sft_coef * CE(y_t)`` for ``cfg`` (a ``LossConfig``; None fields take the
    method's defaults) on ``table`` (buffer rows), plus float metrics. Each term is computed only when
    its weight is > 0.

    ``counts``: ``token_counts`` of the whole step over all ranks (by default this table's own); every
    term is normalised by them, and the loss is multiplied by ``world_size`` (DeepSpeed averages).
    ``health``: a dict that receives ``kd.health.token_health`` sums of the sequences this forward
    trained on (no_grad; the loss is unchanged).
    ``by_teacher``: a dict that receives, per teacher pool of the rows (``teacher_name``; rows without
    one are left out), ``METRIC/NAME -> (sum, count)`` of the metrics that are means over rows or tokens
    (the dpkd row metrics, the SFT cross entropy per token of y_t), from this forward (no_grad).
    ``pair_prompts``: when the loss reads y_t and y_s of every row, run each prompt once for both
    (``paired_response_logits``); False runs it once per sequence (benchmarks/learner_step.py compares)."""
    cfg = resolve_loss(cfg)
    counts = counts or token_counts(table, cfg)
    n = table.num_rows
    from kd.vocab import CROSS_TOKENIZER_LOSSES

    if cfg.type not in CROSS_TOKENIZER_LOSSES and (text := text_path_rows(table)):
        raise ValueError(f"loss.type={cfg.type} needs the teacher's log-probs token by token, but {text} "
                         f"of these {n} rows come from a teacher with another tokenizer (the text path); "
                         f"across tokenizers use {' or '.join(CROSS_TOKENIZER_LOSSES)}")
    on_s = student_rows(table, cfg)
    rows = _main_rows(cfg, n, on_s)
    missing = _rows_without_student(table, rows["rejected"])
    if missing:
        what = f" with student_ratio={cfg.student_ratio}" if cfg.type in L.DIVERGENCES else ""
        raise ValueError(f"loss.type={cfg.type}{what} needs the student's samples y_s (online rows), but "
                         f"{len(missing)} of these {n} rows have none (offline rows)")
    if cfg.sft_coef > 0:
        rows["chosen"] = list(range(n))
    fwd = _Forward(model, table, rows, pad_id, pair_prompts)  # both sides in one forward
    metrics: dict = {}
    loss = fwd.zero()
    if cfg.kd_coef > 0:
        if cfg.type in L.DIVERGENCES:
            main = _divergence_term(fwd, table, cfg, counts, metrics, on_s)
        else:
            term = {"dpkd": _dpkd_term, "dpkd_token": _dpkd_token_term, "pg_rkl": _pg_term}[cfg.type]
            main = term(fwd, table, cfg, counts, metrics)
        loss = loss + cfg.kd_coef * main
    if cfg.sft_coef > 0:
        if fwd.has_logps:  # dpkd has y_t's token log-probs already: the same mean, no second log-softmax
            lpc, mc = fwd.take_logps("chosen", range(n))
            sft = -(lpc * mc).sum() / max(counts["chosen"], 1)
        else:  # chunked: no [n, R, V] float temporary
            lc, ic, mc = fwd.take("chosen", range(n))
            sft = L.sft_loss(lc, ic, mc, num_tokens=counts["chosen"])
        metrics["sft_loss"] = sft.item()
        loss = loss + cfg.sft_coef * sft
    metrics["loss"] = loss.item()
    if health is not None:
        _health(fwd, table, rows, health)
    if by_teacher is not None:
        if cfg.sft_coef > 0:
            fwd.per_row["sft_loss"] = fwd.y_t_ce or _row_ce(fwd, n)
        _split_by_teacher(table, fwd.per_row, by_teacher)
    return loss * float(world_size), metrics


@torch.no_grad()
def _row_ce(fwd: _Forward, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of y_t: the summed token cross entropy and the token count (row by row: no [n, R, V]
    temporary)."""
    sums, tokens = [], []
    for i in range(n):
        lc, ic, mc = fwd.take("chosen", [i])
        sums.append(-(token_logps(lc, ic) * mc).sum())
        tokens.append(mc.sum())
    return torch.stack(sums).float(), torch.stack(tokens).float()


def _split_by_teacher(table: pa.Table, per_row: dict, into: dict) -> None:
    """Add ``per_row``'s numerators and denominators, summed over each teacher pool's rows, into
    ``into`` as ``METRIC/NAME -> (sum, count)`` (``kd.health.add`` sums)."""
    from kd import health

    names = table.column("teacher_name").to_pylist() if "teacher_name" in table.column_names else []
    for name in teacher_pools(table):
        idx = torch.tensor([i for i, m in enumerate(names) if m == name])
        health.add(into, {f"{k}/{name}": (float(num[idx].sum()), float(den[idx].sum()))
                          for k, (num, den) in per_row.items()})


def _health(fwd: _Forward, table: pa.Table, rows: dict[str, list[int]], into: dict) -> None:
    """``kd.health.token_health`` of each side the forward covered, with that side's teacher top-k
    where the rows carry it (positions past a row's stored top-k are left out of the top-k metrics)."""
    from kd import health

    for side, picked in rows.items():
        if not picked:
            continue
        logits, _, mask = fwd.take(side, picked)
        topk = table.take(picked).column(f"{side}_topk_ids").to_pylist()
        k = next((len(r[0]) for r in topk if r and r[0]), 0)
        ids = lps = tmask = None
        if k:
            teacher = topk_teacher(table.take(picked), side, fwd.width)
            ids, lps = teacher.ids, teacher.logprobs
            tmask = pad_2d([[1.0] * len(r or []) for r in topk], fwd.width)
        health.add(into, health.token_health(logits.detach(), mask, ids, lps, tmask))
