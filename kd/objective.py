"""From replay-buffer rows to a scalar loss: batching, the student forward, and ``loss.type`` dispatch.

Pure library (torch, pyarrow): the learner actor wraps it in DeepSpeed; tests call it directly.

Layout of a batch: prompts are LEFT-padded to a common width P and responses RIGHT-padded to a common
width R, so every response starts at column P. The student's logits for the response tokens are then
the slice ``[:, P-1 : P-1+R]`` for every row, computed with ``logits_to_keep`` (no [B, P+R, V] tensor).

Data-parallel normalisation: every count used as a denominator (pairs, tokens) is the GLOBAL count
over all learner ranks, and the loss is multiplied by the world size because DeepSpeed averages
gradients over ranks; K ranks then take the same step as one rank on the whole batch.
"""

from __future__ import annotations

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


def topk_teacher(table: pa.Table, side: str, width: int) -> L.TopK:
    ids = table.column(f"{side}_topk_ids").to_pylist()
    lps = table.column(f"{side}_topk_logps").to_pylist()
    k = next((len(r[0]) for r in ids if r), 0)
    if k == 0:
        raise ValueError(f"loss needs the teacher's top-k on '{side}' responses, but the rows have none "
                         "(set teacher.top_k_logprobs > 0)")
    # Padding positions are masked out of every loss; id 0 / log-prob 0 there is never read.
    return L.TopK(pad_topk(ids, width, k, torch.long, 0), pad_topk(lps, width, k, torch.float32, 0.0))


def response_logits(model, seqs: Seqs) -> torch.Tensor:
    """Student logits [B, R, V] predicting each response token."""
    P, R = seqs.prompt_width, seqs.resp_ids.shape[1]
    keep = torch.arange(P - 1, P - 1 + R)
    out = model(input_ids=seqs.input_ids, attention_mask=seqs.attention_mask,
                position_ids=seqs.position_ids, logits_to_keep=keep, use_cache=False)
    return out.logits


def token_logps(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    logits = logits.float()
    return logits.gather(-1, ids.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)


def compute_loss(model, table: pa.Table, cfg, pad_id: int, global_pairs: int | None = None,
                 global_tokens: dict | None = None, world_size: int = 1) -> tuple[torch.Tensor, dict]:
    """The loss for ``cfg.type`` (a ``LossConfig``) on ``table`` (buffer rows), plus float metrics.

    ``global_pairs`` / ``global_tokens`` (keys 'chosen', 'rejected') are the counts over all ranks;
    by default this batch's own.
    """
    n = table.num_rows
    prompts = table.column("prompt_ids").to_pylist()
    chosen = table.column("chosen_ids").to_pylist()
    rejected = table.column("rejected_ids").to_pylist()
    local_tokens = {"chosen": sum(map(len, chosen)), "rejected": sum(map(len, rejected))}
    global_tokens = global_tokens or local_tokens
    global_pairs = global_pairs or n
    metrics: dict = {}
    kind = cfg.type

    uses_rejected = kind in ("dpkd", "pg_rkl") or (kind in L.DIVERGENCES and local_tokens["rejected"] > 0)
    uses_chosen = kind in ("dpkd", "dpkd_token", "sft") or cfg.lm_coef > 0 or not uses_rejected
    sides = [s for s, used in (("chosen", uses_chosen), ("rejected", uses_rejected)) if used]
    if "rejected" in sides and local_tokens["rejected"] == 0 and kind in ("dpkd", "pg_rkl"):
        raise ValueError(f"loss.type={kind} needs the student's responses (online rows); "
                         "these rows have none")
    seqs = pack(prompts * len(sides), sum(([chosen, rejected][s == "rejected"] for s in sides), []), pad_id)
    logits = response_logits(model, seqs)  # both sides in one forward
    part = {s: slice(i * n, (i + 1) * n) for i, s in enumerate(sides)}
    R = seqs.resp_ids.shape[1]

    def side(s):
        return logits[part[s]], seqs.resp_ids[part[s]], seqs.resp_mask[part[s]]

    scale = float(world_size)
    loss = logits.new_zeros((), dtype=torch.float32)
    if kind == "dpkd":
        (lc, ic, mc), (lr, ir, mr) = side("chosen"), side("rejected")
        pc = (token_logps(lc, ic) * mc).sum(-1)
        pr = (token_logps(lr, ir) * mr).sum(-1)
        ref_c = pad_2d(table.column("chosen_teacher_logps").to_pylist(), R).mul(mc).sum(-1)
        ref_r = pad_2d(table.column("rejected_teacher_logps").to_pylist(), R).mul(mr).sum(-1)
        main, cr, rr = L.dpkd_loss(pc, pr, ref_c, ref_r, mc.sum(-1), mr.sum(-1), beta=cfg.beta,
                                   label_smoothing=cfg.label_smoothing,
                                   length_normalize=cfg.length_normalize)
        loss = loss + main * (n / global_pairs) * scale
        metrics.update(
            dpkd_loss=main.item(), chosen_reward=cr.mean().item(), rejected_reward=rr.mean().item(),
            reward_margin=(cr - rr).mean().item(), reward_accuracy=(cr > rr).float().mean().item(),
            chosen_logratio=((pc - ref_c) / mc.sum(-1).clamp(min=1)).mean().item(),
            rejected_logratio=((pr - ref_r) / mr.sum(-1).clamp(min=1)).mean().item(),
        )
    elif kind == "dpkd_token":
        lc, ic, mc = side("chosen")
        main = L.dpkd_token_loss(lc, topk_teacher(table, "chosen", R), mc, beta=cfg.beta,
                                 num_tokens=global_tokens["chosen"])
        loss = loss + main * scale
        metrics["dpkd_token_loss"] = main.item()
    elif kind in L.DIVERGENCES:
        s = "rejected" if "rejected" in sides else "chosen"
        lx, _, mx = side(s)
        kwargs = {"beta": cfg.jsd_beta} if kind == "jsd" else (
            {"alpha": cfg.skew_alpha} if kind.startswith("skew") else {})
        main = L.get_divergence(kind)(lx, topk_teacher(table, s, R), mx, temperature=cfg.temperature,
                                      num_tokens=global_tokens[s], **kwargs)
        loss = loss + main * scale
        metrics[f"{kind}_loss"] = main.item()
    elif kind == "pg_rkl":
        lr, ir, mr = side("rejected")
        behaviour = pad_2d(table.column("rejected_behaviour_logps").to_pylist(), R)
        teacher = pad_2d(table.column("rejected_teacher_logps").to_pylist(), R)
        main, stats = L.reverse_kl_policy_gradient(token_logps(lr, ir), behaviour, teacher, mr,
                                                   num_tokens=global_tokens["rejected"])
        loss = loss + main * scale
        metrics.update(pg_loss=main.item(), **{k: float(v) for k, v in stats.items()})
    if kind == "sft" or (cfg.lm_coef > 0 and kind != "sft"):
        lc, ic, mc = side("chosen")
        lm = L.sft_loss(lc, ic, mc, num_tokens=global_tokens["chosen"])
        coef = 1.0 if kind == "sft" else cfg.lm_coef
        loss = loss + coef * lm * scale
        metrics["lm_loss"] = lm.item()
    metrics["loss"] = loss.item() / scale
    return loss, metrics
