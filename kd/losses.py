"""Distillation losses: the one place every loss lives (the learner picks one by ``loss.type``).

Pure torch: no ray, vllm, deepspeed or transformers, so everything here is unit-testable on a CPU.

Notation: ``q`` is the student, ``p`` the teacher (as in the DPKD paper). Shapes: ``B`` batch, ``T``
positions, ``V`` vocabulary, ``k`` teacher top-k; any leading shape works where ``[B, T]`` is written.

Conventions shared by the token-level losses (divergences, ``dpkd_token_loss``, ``sft_loss``):

* ``student_logits[b, t]`` is already aligned with ``teacher[b, t]`` / ``labels[b, t]``: the caller shifts.
* Maths runs in fp32 (fp64 inputs stay fp64, for gradcheck); the gradient has the student's dtype.
* ``mask[B, T]`` (bool or 0/1; any non-zero counts) selects positions; masked positions are never read,
  so padding may hold anything, including NaN.
* The result is ``sum over unmasked positions / num_tokens``; ``num_tokens`` defaults to this batch's mask
  sum, and a data-parallel learner passes the global count across ranks so that every rank's gradient
  adds up to the global token mean. The denominator is clamped to >= 1: an all-masked batch gives exactly
  0 with finite (zero) gradients.
* The teacher is a constant: no gradient flows into it.
* Memory: only unmasked positions are processed, ``chunk_size`` positions at a time. Chunking also holds
  in the autograd graph: ``_ChunkedRowLoss`` differentiates each chunk as it goes and keeps only the
  ``[N, V]`` gradient (allocated in forward, handed over in backward), so beyond the inputs and that
  gradient, peak memory is one chunk's intermediates, whatever ``B*T``. ``chunk_size=None`` is the plain
  unchunked autograd graph (the reference for tests and the benchmark); both give the same values and
  gradients. The default chunk is small on purpose: at V=49152 a 128-row fp32 chunk is 24 MiB, under
  glibc's 32 MiB mmap threshold, so on CPU its temporaries are reused from the heap instead of being
  mapped and page-faulted afresh for every chunk (larger chunks were measured slower, not faster).

Teacher as ``TopK`` (what vLLM teachers give): the teacher's k log-probs and its remaining ("tail") mass
``clamp(1 - sum exp(logprobs), min=0)``, which reaches the divergence in one of two ways (``TopK.tail``):

- ``"uniform"``: the tail mass is spread evenly over the V - k other ids, and the divergence is taken
  over the whole vocabulary against the student's full distribution. Every student token outside the
  teacher's top-k is then compared with a small teacher probability, as in the full-vocabulary loss.
- ``"bucket"``: the tail is one outcome; the student is coarsened to the same k+1 outcomes (its mass on
  the k ids, and all the rest in its tail), so the divergence is exact over these k+1 outcomes and, by
  data processing, a lower bound on the full-vocabulary one. It is blind to where the student puts
  its tail mass: on the student's own samples, where a teacher is diffuse (its top-16 held 0.3 of the
  mass on an untrained student's samples), the student can match the tail's total while disagreeing
  with the teacher everywhere. Measured (``docs/losses.md``): 16 on-policy JSD steps took held-out
  KL(t||s) from 18.9 to 11.5 with full logits, 12.0 with a uniform tail and 16.9 with a bucket (k=16).

With k == V there is no tail and both equal the full-logits loss. The k ids of a position must be
distinct.

Temperature ``tau``: with full logits both sides are ``softmax(logits / tau)``. A ``TopK`` teacher with
k < V and ``tau != 1`` is refused (ValueError): its log-probs come at temperature 1 and the tail's inner
distribution is unknown, so the tempered teacher cannot be formed, and tempering the k+1 buckets instead
is a different objective, not an approximation (a reported example: forward KL 3.10 against 1.21 on the
full vocabulary at tau=2, k=8). With k == V there is no tail and tempering is exact. No ``tau**2`` factor is applied; scale
outside if wanted.

Non-finite inputs: log-probabilities on BOTH sides are floored at ``log(float32 tiny)`` ~ -87.3 (after
tempering), so a ``-inf`` teacher logit or log-prob (an outcome the teacher rules out, a zero tail) and a
``-inf`` student logit give large but finite values with finite gradients, never inf/NaN. The floor is a
``clamp``: a floored entry gets zero gradient, and no NaN can reach the gradient through a masked branch.
``dpkd_token_loss`` floors the same way, ``reverse_kl_policy_gradient`` floors the teacher log-probs and
``dpkd_loss`` floors each reference sum at ``len * floor``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

DEFAULT_CHUNK_SIZE = 128  # positions; see the module docstring on why small
_LOG_TINY = math.log(torch.finfo(torch.float32).tiny)  # ~ -87.34

TOPK_TAILS = ("uniform", "bucket")
LOSS_TYPES = ("dpkd", "dpkd_token", "fkl", "rkl", "jsd", "skew_fkl", "skew_rkl", "tvd", "sft", "pg_rkl")


@dataclass(frozen=True)
class TopK:
    """A teacher given as its top-k per position: ``ids [B, T, k]`` (int) and ``logprobs [B, T, k]``
    (log-probabilities at temperature 1, as an inference engine reports them); ``tail``: how the mass
    outside the top-k enters a divergence, "uniform" or "bucket" (module docstring)."""

    ids: Tensor
    logprobs: Tensor
    tail: str = "uniform"

    def __post_init__(self):
        if self.tail not in TOPK_TAILS:
            raise ValueError(f"TopK.tail must be one of {', '.join(TOPK_TAILS)}, got {self.tail!r}")


# --------------------------------------------------------------------------------------------------
# Chunked row-wise reduction that keeps no intermediates in the autograd graph
# --------------------------------------------------------------------------------------------------


def _acc_dtype(t: Tensor) -> torch.dtype:
    """fp32 for the maths; fp64 is kept so that gradcheck can run in double precision."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _up(t: Tensor) -> Tensor:
    return t.to(_acc_dtype(t))


def _run_chunks(kernel, x: Tensor, rows: Tensor, aux, chunk_size: int, grad: Tensor | None) -> Tensor:
    """``sum_i kernel(x[rows_i], *aux[rows_i])``, ``chunk_size`` rows at a time; with a ``grad`` buffer
    ``[N, V]``, also writes the sum's gradient w.r.t. ``x`` into it. Each chunk's graph is built,
    differentiated and freed before the next, so no ``[N, V]`` intermediate outlives its chunk."""
    total = torch.zeros((), dtype=_acc_dtype(x), device=x.device)
    for idx in rows.split(chunk_size):
        chunk_aux = [a[idx] for a in aux]
        if grad is None:
            with torch.no_grad():
                total += kernel(_up(x[idx]), *chunk_aux).sum()
            continue
        with torch.enable_grad():
            xc = _up(x.detach()[idx]).requires_grad_()
            loss = kernel(xc, *chunk_aux).sum()
            (g,) = torch.autograd.grad(loss, xc)
        total += loss.detach()
        grad.index_copy_(0, idx, g.to(grad.dtype))
    return total


class _ChunkedRowLoss(torch.autograd.Function):
    """The chunked sum as one autograd node that keeps no intermediates.

    When the input needs a gradient, forward computes it chunk by chunk into one ``[N, V]`` buffer (the
    gradient backward must return anyway; computing it here spares a second forward pass per chunk) and
    the first backward scales that buffer in place and hands it over. A further backward through a
    retained graph (e.g. gradcheck) recomputes the chunks from the saved inputs.
    ``kernel(x_chunk [n, V] (fp32/fp64), *aux_chunks) -> [n]``.
    """

    @staticmethod
    def forward(ctx, x, rows, kernel, chunk_size, *aux):
        grad = torch.zeros_like(x) if ctx.needs_input_grad[0] else None
        total = _run_chunks(kernel, x, rows, aux, chunk_size, grad)
        ctx.save_for_backward(x, rows, *aux)  # references to the inputs, not copies
        ctx.kernel, ctx.chunk_size, ctx.grad = kernel, chunk_size, grad
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_total):
        x, rows, *aux = ctx.saved_tensors
        grad, ctx.grad = ctx.grad, None
        if grad is None:
            grad = torch.zeros_like(x)
            _run_chunks(ctx.kernel, x, rows, aux, ctx.chunk_size, grad)
        return (grad.mul_(grad_total), None, None, None) + (None,) * len(aux)


def _denominator(mask: Tensor, num_tokens, like: Tensor) -> Tensor:
    n = (mask != 0).sum() if num_tokens is None else torch.as_tensor(num_tokens)
    return n.to(device=like.device, dtype=like.dtype).clamp(min=1)


def _token_mean(kernel, student_logits: Tensor, aux: tuple, mask: Tensor, num_tokens, chunk_size) -> Tensor:
    """Flatten ``[B, T, V] -> [N, V]``, keep unmasked rows, reduce with ``kernel``, divide by the count."""
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    x = student_logits.reshape(-1, student_logits.shape[-1])
    rows = (mask.reshape(-1) != 0).nonzero().squeeze(1).to(x.device)
    aux = tuple(a.detach().reshape(x.shape[0], *a.shape[mask.dim():]) for a in aux)
    if chunk_size is None:
        total = kernel(_up(x[rows]), *(a[rows] for a in aux)).sum()
    elif torch.is_grad_enabled() and x.requires_grad:
        total = _ChunkedRowLoss.apply(x, rows, kernel, chunk_size, *aux)
    else:  # evaluation: no gradient buffer to fill
        total = _run_chunks(kernel, x, rows, aux, chunk_size, None)
    return total / _denominator(mask, num_tokens, total)


def _check_inputs(student_logits: Tensor, teacher, mask: Tensor, temperature: float = 1.0) -> tuple:
    """Validate shapes up front (a clear message instead of a failure deep in a chunk); return aux."""
    lead, vocab = tuple(student_logits.shape[:-1]), student_logits.shape[-1]
    if tuple(mask.shape) != lead:
        raise ValueError(f"mask shape {tuple(mask.shape)} must equal student_logits.shape[:-1] = {lead}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if isinstance(teacher, TopK):
        ids, lps = teacher.ids, teacher.logprobs
        if ids.shape != lps.shape or tuple(ids.shape[:-1]) != lead or not 1 <= ids.shape[-1] <= vocab:
            raise ValueError(
                f"TopK ids {tuple(ids.shape)} and logprobs {tuple(lps.shape)} must both be "
                f"{lead} + (k,) with 1 <= k <= V={vocab}"
            )
        if temperature != 1 and ids.shape[-1] < vocab:
            raise ValueError(
                f"temperature={temperature} with a top-k teacher (k={ids.shape[-1]} < V={vocab}): the tempered "
                "teacher needs its full distribution, and tempering the k+1 buckets is a different objective, "
                "not an approximation; use temperature=1 or full teacher logits"
            )
        return (ids.long(), lps)
    if not isinstance(teacher, Tensor) or teacher.shape != student_logits.shape:
        got = tuple(teacher.shape) if isinstance(teacher, Tensor) else type(teacher).__name__
        raise ValueError(f"teacher logits {got} must match student_logits {tuple(student_logits.shape)}")
    return (teacher,)


# --------------------------------------------------------------------------------------------------
# Log-probabilities of both sides over the common outcomes (V, or k ids + tail)
# --------------------------------------------------------------------------------------------------


def _teacher_topk_buckets(ids: Tensor, logprobs: Tensor, vocab: int, dtype) -> Tensor:
    """``[n, k(+1)]`` teacher bucket log-probs at temperature 1: the k logprobs and, if k < V, the tail."""
    lps = logprobs.to(dtype)
    if ids.shape[-1] == vocab:
        return lps
    # fp64 for the sum: 1 - sum(p) cancels badly when the top-k holds almost all the mass.
    tail = (1 - lps.double().exp().sum(-1, keepdim=True)).clamp(min=0).log().to(dtype)
    return torch.cat([lps, tail], -1)


def _student_topk_buckets(x: Tensor, ids: Tensor) -> Tensor:
    """``[n, k(+1)]`` student bucket *logits*: its logits at the k ids and, if k < V, the logsumexp of all
    other logits (computed exactly, not as 1 - sum, so a confident student's tiny tail stays accurate)."""
    top = x.gather(-1, ids)
    if ids.shape[-1] == x.shape[-1]:
        return top
    rest = x.scatter(-1, ids, float("-inf")).logsumexp(-1, keepdim=True)
    return torch.cat([top, rest], -1)


def _teacher_uniform_tail(ids: Tensor, logprobs: Tensor, vocab: int, dtype) -> Tensor:
    """``[n, V]`` teacher log-probs: the k logprobs at their ids, the tail mass spread evenly over the
    other ``V - k`` ids (``-inf`` where the tail is empty; the caller floors it)."""
    lps = logprobs.to(dtype)
    k = ids.shape[-1]
    if k == vocab:
        return torch.empty(lps.shape, dtype=dtype, device=lps.device).scatter_(-1, ids, lps)
    tail = (1 - lps.double().exp().sum(-1, keepdim=True)).clamp(min=0)  # fp64: see _teacher_topk_buckets
    per_id = (tail / (vocab - k)).log().to(dtype)
    return per_id.expand(-1, vocab).clone().scatter_(-1, ids, lps)


def _log_probs(x: Tensor, teacher: tuple, temperature: float, tail: str) -> tuple[Tensor, Tensor]:
    """``(log q, log p)``, each ``[n, K]`` and floored at ``_LOG_TINY``, from student logits ``x [n, V]``
    and a teacher chunk (either ``(logits [n, V],)`` or ``(ids [n, k], logprobs [n, k])``, whose tail
    enters as ``tail`` says; top-k only at temperature 1 or k == V, see ``_check_inputs``)."""
    if len(teacher) == 2 and tail == "uniform":
        student, teacher_b = x, _teacher_uniform_tail(*teacher, x.shape[-1], x.dtype)
    elif len(teacher) == 2:
        ids, lps = teacher
        student = _student_topk_buckets(x, ids)
        teacher_b = _teacher_topk_buckets(ids, lps, x.shape[-1], x.dtype)
    else:
        student, teacher_b = x, teacher[0].to(x.dtype)
    if temperature != 1:  # skipped at 1: two [n, V] temporaries fewer
        student, teacher_b = student / temperature, teacher_b / temperature
    # Floor both sides: a -inf logit would otherwise give 0 * -inf = NaN in the KL sums. clamp() passes
    # no gradient to floored entries (their probability is below float32 tiny anyway).
    logq = F.log_softmax(student, -1).clamp(min=_LOG_TINY)
    logp = F.log_softmax(teacher_b, -1).clamp(min=_LOG_TINY)
    return logq, logp


def _kl(loga: Tensor, logb: Tensor) -> Tensor:
    """Row-wise ``KL(a || b)`` from floored (finite) log-probabilities, so ``0 * log 0`` never arises."""
    return (loga.exp() * (loga - logb)).sum(-1)


def _log_mix(loga: Tensor, logb: Tensor, w: float) -> Tensor:
    """``log(w * a + (1 - w) * b)``, stable; the endpoints are exact."""
    if w == 0:
        return logb
    if w == 1:
        return loga
    return torch.logaddexp(loga + math.log(w), logb + math.log1p(-w))


def _divergence_kernel(div, temperature: float, tail: str):
    def kernel(x: Tensor, *teacher: Tensor) -> Tensor:
        logq, logp = _log_probs(x, teacher, temperature, tail)
        return div(logq, logp)

    return kernel


def _check_unit(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")


# --------------------------------------------------------------------------------------------------
# Token-level divergences. Each: (student_logits [B,T,V], teacher [B,T,V] | TopK, mask [B,T],
# temperature=1.0, ..., *, num_tokens=None, chunk_size=DEFAULT_CHUNK_SIZE) -> scalar fp32 loss.
# --------------------------------------------------------------------------------------------------


def _divergence(div, student_logits, teacher, mask, temperature, num_tokens, chunk_size) -> Tensor:
    aux = _check_inputs(student_logits, teacher, mask, temperature)
    tail = teacher.tail if isinstance(teacher, TopK) else "uniform"
    return _token_mean(_divergence_kernel(div, temperature, tail), student_logits, aux, mask, num_tokens,
                       chunk_size)


def forward_kl(student_logits, teacher, mask, temperature=1.0, *, num_tokens=None,
               chunk_size=DEFAULT_CHUNK_SIZE) -> Tensor:
    """Token mean of ``KL(p_teacher || q_student)`` (mode-covering; the classic KD / GKD beta=0 loss)."""
    return _divergence(lambda lq, lp: _kl(lp, lq), student_logits, teacher, mask, temperature, num_tokens,
                       chunk_size)


def reverse_kl(student_logits, teacher, mask, temperature=1.0, *, num_tokens=None,
               chunk_size=DEFAULT_CHUNK_SIZE) -> Tensor:
    """Token mean of ``KL(q_student || p_teacher)`` (mode-seeking; MiniLLM's objective, GKD beta=1)."""
    return _divergence(lambda lq, lp: _kl(lq, lp), student_logits, teacher, mask, temperature, num_tokens,
                       chunk_size)


def generalized_jsd(student_logits, teacher, mask, temperature=1.0, beta=0.5, *, num_tokens=None,
                    chunk_size=DEFAULT_CHUNK_SIZE) -> Tensor:
    """GKD's generalised JSD with TRL's ``GKDTrainer`` convention:

    ``m = beta * p + (1 - beta) * q;  JSD_beta = beta * KL(p || m) + (1 - beta) * KL(q || m)``

    for 0 < beta < 1, and exactly ``KL(p || q)`` (forward) at beta = 0 and ``KL(q || p)`` (reverse) at
    beta = 1. The endpoints are definitions, not limits: JSD_beta itself tends to 0 at both ends (it is
    JSD_beta / beta that tends to the forward KL as beta -> 0, and JSD_beta / (1 - beta) to the reverse
    KL as beta -> 1), exactly as in TRL. Symmetric in (p, q) at beta = 0.5.
    """
    _check_unit("beta", beta)

    def div(logq, logp):
        if beta == 0:
            return _kl(logp, logq)
        if beta == 1:
            return _kl(logq, logp)
        logm = _log_mix(logp, logq, beta)
        return beta * _kl(logp, logm) + (1 - beta) * _kl(logq, logm)

    return _divergence(div, student_logits, teacher, mask, temperature, num_tokens, chunk_size)


def skew_forward_kl(student_logits, teacher, mask, temperature=1.0, alpha=0.1, *, num_tokens=None,
                    chunk_size=DEFAULT_CHUNK_SIZE) -> Tensor:
    """DistiLLM's skew KL: ``KL(p || alpha * p + (1 - alpha) * q)``; alpha = 0 is forward KL."""
    _check_unit("alpha", alpha)
    return _divergence(lambda lq, lp: _kl(lp, _log_mix(lp, lq, alpha)), student_logits, teacher, mask,
                       temperature, num_tokens, chunk_size)


def skew_reverse_kl(student_logits, teacher, mask, temperature=1.0, alpha=0.1, *, num_tokens=None,
                    chunk_size=DEFAULT_CHUNK_SIZE) -> Tensor:
    """DistiLLM's skew reverse KL: ``KL(q || alpha * q + (1 - alpha) * p)``; alpha = 0 is reverse KL."""
    _check_unit("alpha", alpha)
    return _divergence(lambda lq, lp: _kl(lq, _log_mix(lq, lp, alpha)), student_logits, teacher, mask,
                       temperature, num_tokens, chunk_size)


def total_variation(student_logits, teacher, mask, temperature=1.0, *, num_tokens=None,
                    chunk_size=DEFAULT_CHUNK_SIZE) -> Tensor:
    """Token mean of ``TVD = 0.5 * sum |p - q|`` (bounded in [0, 1])."""
    return _divergence(lambda lq, lp: 0.5 * (lp.exp() - lq.exp()).abs().sum(-1), student_logits, teacher,
                       mask, temperature, num_tokens, chunk_size)


DIVERGENCES = {
    "fkl": forward_kl,
    "rkl": reverse_kl,
    "jsd": generalized_jsd,
    "skew_fkl": skew_forward_kl,
    "skew_rkl": skew_reverse_kl,
    "tvd": total_variation,
}


def get_divergence(name: str):
    """The divergence registered as ``name`` (a ``loss.type``), or a ValueError naming the allowed ones."""
    if name not in DIVERGENCES:
        raise ValueError(f"unknown divergence {name!r}; allowed: {', '.join(DIVERGENCES)}")
    return DIVERGENCES[name]


# --------------------------------------------------------------------------------------------------
# SFT (SeqKD on teacher text, and the lm term of DPKD)
# --------------------------------------------------------------------------------------------------


def sft_loss(student_logits, labels, mask, *, num_tokens=None, chunk_size=DEFAULT_CHUNK_SIZE) -> Tensor:
    """Token-mean cross entropy. ``student_logits [B, T, V]``, ``labels [B, T]`` (int, the target of
    ``student_logits[b, t]``: already shifted), ``mask [B, T]``. Labels under the mask are never read."""
    vocab = student_logits.shape[-1]
    if tuple(labels.shape) != tuple(student_logits.shape[:-1]) or labels.shape != mask.shape:
        raise ValueError(f"labels {tuple(labels.shape)} and mask {tuple(mask.shape)} must equal "
                         f"student_logits.shape[:-1] = {tuple(student_logits.shape[:-1])}")
    live = labels[mask != 0]
    if live.numel() and (live.min() < 0 or live.max() >= vocab):
        raise ValueError(f"unmasked labels must lie in [0, {vocab}), got [{live.min()}, {live.max()}]")

    def kernel(x, target):
        return x.logsumexp(-1) - x.gather(-1, target[:, None]).squeeze(-1)

    return _token_mean(kernel, student_logits, (labels.long(),), mask, num_tokens, chunk_size)


# --------------------------------------------------------------------------------------------------
# DPKD (Li et al. 2024, arXiv 2406.19774): sequence level, and the released code's token level
# --------------------------------------------------------------------------------------------------


def dpkd_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
              chosen_lengths, rejected_lengths, beta=0.1, label_smoothing=0.0, length_normalize=True):
    """Sequence-level DPKD (Eq. 9): chosen = the teacher's output y_t, rejected = the student's y_s,
    policy = the student q, reference = the teacher p. All inputs ``[B]``: SUMMED log-probs of each
    sequence and token counts (clamped to >= 1, so an empty sequence gives no NaN).

    ``z = beta/|y_t| * (log q(y_t) - log p(y_t)) - beta/|y_s| * (log q(y_s) - log p(y_s))``
    (no ``1/|y|`` with ``length_normalize=False``);
    ``loss = mean_b[(1 - eps) * -log sigmoid(z) + eps * -log sigmoid(-z)]`` (conservative DPO smoothing).
    Each reference sum is floored at ``max(len, 1) * log(float32 tiny)``, so a ``-inf`` teacher log-prob
    gives a finite loss and gradient.

    Returns ``(loss, chosen_rewards [B], rejected_rewards [B])``; the rewards are the two detached terms of
    ``z``. The loss is below log 2 when the student prefers the teacher's output more than the teacher does.
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    pc, pr, rc, rr = (_up(t) for t in (policy_chosen_logps, policy_rejected_logps,
                                       ref_chosen_logps, ref_rejected_logps))
    len_c = _up(torch.as_tensor(chosen_lengths, device=pc.device)).clamp(min=1)
    len_r = _up(torch.as_tensor(rejected_lengths, device=pc.device)).clamp(min=1)
    # A -inf teacher log-prob makes a reference sum -inf, the reward +inf and the gradient NaN: floor each
    # sum where per-token flooring would put it (every token at log(float32 tiny)).
    rc, rr = torch.maximum(rc, _LOG_TINY * len_c), torch.maximum(rr, _LOG_TINY * len_r)
    scale_c = scale_r = torch.full_like(pc, beta)
    if length_normalize:
        scale_c, scale_r = beta / len_c, beta / len_r
    chosen = scale_c * (pc - rc.detach())
    rejected = scale_r * (pr - rr.detach())
    z = chosen - rejected
    losses = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    loss = losses.sum() / max(losses.numel(), 1)  # an empty batch gives 0, not NaN
    return loss, chosen.detach(), rejected.detach()


def _dpkd_token_kernel(beta: float):
    """Per position: ``-log sigmoid(beta * h)``, ``h = (log q(a_t) - log p(a_t)) - (log q(a_s) - log p(a_s))``
    with ``a_t`` the teacher's argmax and ``a_s`` the student's (argmaxes carry no gradient)."""

    def kernel(x: Tensor, *teacher: Tensor) -> Tensor:
        lse = x.logsumexp(-1, keepdim=True)
        a_s = x.argmax(-1, keepdim=True)

        def logq(a):  # floored, so that a -inf student logit at a_t gives a finite loss and gradient
            return (x.gather(-1, a) - lse).clamp(min=_LOG_TINY)

        if len(teacher) == 1:
            logp = F.log_softmax(teacher[0].to(x.dtype), -1).clamp(min=_LOG_TINY)
            a_t = logp.argmax(-1, keepdim=True)
            lp_t, lp_s = logp.gather(-1, a_t), logp.gather(-1, a_s)
        else:
            ids, lps = teacher
            lps = lps.to(x.dtype)
            top = lps.argmax(-1, keepdim=True)  # the ids need not be sorted
            a_t, lp_t = ids.gather(-1, top), lps.gather(-1, top)
            hit = ids == a_s
            known = torch.where(hit, lps, float("-inf")).amax(-1, keepdim=True)
            # a_s outside the top-k: no token there is likelier than the smallest top-k token, nor than the
            # whole tail, so log p(a_s) <= min(min top-k logprob, log tail). We use that upper bound: it is
            # tight for near-misses (the usual case for a student's argmax) and never overstates the loss.
            buckets = _teacher_topk_buckets(ids, lps, x.shape[-1], x.dtype)
            bound = buckets.amin(-1, keepdim=True).clamp(min=_LOG_TINY)
            lp_s = torch.where(hit.any(-1, keepdim=True), known, bound)  # teacher side: no gradient
            lp_t, lp_s = lp_t.clamp(min=_LOG_TINY), lp_s.clamp(min=_LOG_TINY)
        h = (logq(a_t) - lp_t) - (logq(a_s) - lp_s)
        return -F.logsigmoid(beta * h).squeeze(-1)

    return kernel


def dpkd_token_loss(student_logits, teacher, mask, beta=0.1, *, num_tokens=None,
                    chunk_size=DEFAULT_CHUNK_SIZE) -> Tensor:
    """Token-level DPKD (the released code's variant): at each teacher-forced position the teacher's argmax
    token is preferred over the student's; token mean of ``-log sigmoid(beta * h)`` (see the kernel).

    ``teacher``: logits ``[B, T, V]`` or ``TopK`` (teacher argmax = its most likely listed id; a student
    argmax outside the top-k gets the upper bound described in the kernel). Where both argmaxes agree,
    ``h`` is exactly 0: the position contributes the constant log 2 with zero gradient and still counts in
    the denominator, so the value stays a per-token mean comparable across batches and ranks.
    """
    aux = _check_inputs(student_logits, teacher, mask)
    return _token_mean(_dpkd_token_kernel(beta), student_logits, aux, mask, num_tokens, chunk_size)


# --------------------------------------------------------------------------------------------------
# On-policy reverse KL by policy gradient (MiniLLM / "on-policy distillation")
# --------------------------------------------------------------------------------------------------


def _discounted_future_sum(rewards: Tensor, gamma: float) -> Tensor:
    """``A_t = sum_{t' >= t} gamma^(t'-t) r_t'`` along the last dim (masked rewards are already 0)."""
    out = torch.empty_like(rewards)
    running = torch.zeros_like(rewards[..., 0])
    for t in range(rewards.shape[-1] - 1, -1, -1):
        running = rewards[..., t] + gamma * running
        out[..., t] = running
    return out


def reverse_kl_policy_gradient(student_logps, behaviour_logps, teacher_logps, mask, clip_ratio=0.2, *,
                               gamma=0.0, num_tokens=None):
    """PPO-style surrogate whose gradient descends the reverse KL on sampled tokens.

    Inputs ``[B, T]``, for the tokens the sampler produced: ``student_logps`` (current student, carries
    the gradient), ``behaviour_logps`` (the sampler's policy when it sampled), ``teacher_logps``.
    Reward ``r_t = log p(y_t) - log q(y_t)`` (student detached; minus a one-sample reverse-KL estimate;
    ``log p`` floored at ``log(float32 tiny)``).
    Advantage ``A_t = r_t`` by default (``gamma=0``); ``gamma > 0`` sums discounted future rewards
    (``gamma=1``: MiniLLM's undiscounted return). Ratio ``rho = exp(student - behaviour)`` corrects for
    stale samples; ``loss = -sum min(rho*A, clip(rho, 1-eps, 1+eps)*A) / num_tokens``.

    Returns ``(loss, stats)``; ``stats`` holds detached scalars over this batch's unmasked tokens:
    ``reverse_kl`` (mean of ``log q - log p``), ``clip_frac`` (share of tokens whose clipped branch
    was active, i.e. had no gradient), ``ratio_mean``, ``advantage_mean``.
    """
    if not clip_ratio >= 0:
        raise ValueError(f"clip_ratio must be >= 0, got {clip_ratio}")
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    if not student_logps.shape == behaviour_logps.shape == teacher_logps.shape == mask.shape:
        raise ValueError("student_logps, behaviour_logps, teacher_logps and mask must share one shape, got "
                         f"{[tuple(t.shape) for t in (student_logps, behaviour_logps, teacher_logps, mask)]}")
    live = mask != 0
    s = _up(student_logps)
    # The teacher floor keeps a -inf teacher log-prob (a token it rules out) a large, finite penalty.
    t = _up(teacher_logps).detach().clamp(min=_LOG_TINY)
    # where(), not multiplication, so that padding holding inf/NaN cannot leak into values or gradients.
    rewards = torch.where(live, t - s.detach(), 0.0)
    adv = rewards if gamma == 0 else _discounted_future_sum(rewards, gamma)
    return _clipped_surrogate(s, behaviour_logps, adv, live, clip_ratio, num_tokens, reverse_kl=-rewards.sum())


def sequence_reverse_kl_policy_gradient(student_logps, behaviour_logps, teacher_seq_logps, mask,
                                        clip_ratio=0.2, *, num_tokens=None):
    """``reverse_kl_policy_gradient`` when the teacher gives one log-prob per sequence: its log-prob
    of the same text under its own tokenizer (the text path, docs/teachers.md), so no per-token reward
    exists. Every token of row ``b`` gets the sequence's reward as its advantage,
    ``A_b = log p(y) - sum_t log q(y_t)`` (student detached; REINFORCE on the sequence-level reverse
    KL, whose gradient is ``E_q[grad log q(y) * (log q(y) - log p(y))]``), in the same clipped
    surrogate. ``teacher_seq_logps``: ``[B]``. Stats as ``reverse_kl_policy_gradient``'s."""
    if not clip_ratio >= 0:
        raise ValueError(f"clip_ratio must be >= 0, got {clip_ratio}")
    if not (student_logps.shape == behaviour_logps.shape == mask.shape
            and teacher_seq_logps.shape == student_logps.shape[:1]):
        raise ValueError("student_logps, behaviour_logps and mask must share one shape [B, T] and "
                         "teacher_seq_logps be [B], got "
                         f"{[tuple(x.shape) for x in (student_logps, behaviour_logps, mask, teacher_seq_logps)]}")
    live = mask != 0
    s = _up(student_logps)
    t = _up(teacher_seq_logps).detach()
    seq_reward = t - torch.where(live, s.detach(), 0.0).sum(-1)
    adv = torch.where(live, seq_reward[:, None], 0.0)
    return _clipped_surrogate(s, behaviour_logps, adv, live, clip_ratio, num_tokens, reverse_kl=-seq_reward.sum())


def _clipped_surrogate(s, behaviour_logps, adv, live, clip_ratio, num_tokens, reverse_kl):
    """``-sum min(rho*A, clip(rho, 1-eps, 1+eps)*A) / num_tokens`` with ``rho = exp(s - behaviour)``,
    and the batch's stats (``reverse_kl``: the summed reverse-KL estimate, divided here per token)."""
    b = _up(behaviour_logps).detach()
    ratio = torch.where(live, s - b, 0.0).exp()
    clipped = ratio.clamp(1 - clip_ratio, 1 + clip_ratio)
    per_token = torch.where(live, -torch.minimum(ratio * adv, clipped * adv), 0.0)
    loss = per_token.sum() / _denominator(live, num_tokens, per_token)

    with torch.no_grad():
        n = live.sum().clamp(min=1)
        clip_active = ((adv > 0) & (ratio > 1 + clip_ratio)) | ((adv < 0) & (ratio < 1 - clip_ratio))
        stats = {
            "reverse_kl": reverse_kl / n,
            "clip_frac": (clip_active & live).sum() / n,
            "ratio_mean": torch.where(live, ratio, 0.0).sum() / n,
            "advantage_mean": torch.where(live, adv, 0.0).sum() / n,
        }
    return loss, stats
