"""kd.losses against reference formulas and by its properties; tiny tensors, the whole file runs in seconds."""

import math
import weakref

import pytest
import torch
import torch.nn.functional as F

from kd import losses as L
from kd.losses import TopK

B, T, V = 2, 5, 11
ALL_DIVS = sorted(L.DIVERGENCES)


def make(seed=0, b=B, t=T, v=V, dtype=torch.float32, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    student = (torch.randn(b, t, v, generator=g, dtype=dtype) * scale).requires_grad_()
    teacher = torch.randn(b, t, v, generator=g, dtype=dtype) * scale
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[0, -2:] = False  # padding at the end of the first row
    return student, teacher, mask


def topk_of(teacher_logits, k, shuffle=False, tail="uniform"):
    lp = teacher_logits.float().log_softmax(-1)
    vals, ids = lp.topk(k, dim=-1)
    if shuffle:  # the loss must not assume the ids are sorted by probability
        perm = torch.randperm(k, generator=torch.Generator().manual_seed(1))
        vals, ids = vals[..., perm], ids[..., perm]
    return TopK(ids, vals, tail)


def token_mean(per_token, mask):
    return (per_token * mask).sum() / mask.sum()


def ref_kl(logp, logq):
    """KL(p || q) per position via F.kl_div (input = log q, target = log p)."""
    return F.kl_div(logq, logp, reduction="none", log_target=True).sum(-1)


def ref_logprobs(student, teacher, tau=1.0):
    return F.log_softmax(student / tau, -1), F.log_softmax(teacher / tau, -1)


def log_mix(la, lb, w):
    return torch.log(w * la.exp() + (1 - w) * lb.exp())


def ref_divergence(name, logq, logp, **kw):
    if name == "fkl":
        return ref_kl(logp, logq)
    if name == "rkl":
        return ref_kl(logq, logp)
    if name == "jsd":
        beta = kw.get("beta", 0.5)
        lm = log_mix(logp, logq, beta)
        return beta * ref_kl(logp, lm) + (1 - beta) * ref_kl(logq, lm)
    if name == "skew_fkl":
        return ref_kl(logp, log_mix(logp, logq, kw.get("alpha", 0.1)))
    if name == "skew_rkl":
        return ref_kl(logq, log_mix(logq, logp, kw.get("alpha", 0.1)))
    assert name == "tvd"
    return 0.5 * (logp.exp() - logq.exp()).abs().sum(-1)


# ------------------------------------------------------------------------------------ reference values


@pytest.mark.parametrize("name", ALL_DIVS)
@pytest.mark.parametrize("tau", [1.0, 2.5])
def test_full_logits_match_reference(name, tau):
    s, t, m = make()
    got = L.DIVERGENCES[name](s, t, m, temperature=tau)
    logq, logp = ref_logprobs(s.detach(), t, tau)
    want = token_mean(ref_divergence(name, logq, logp), m)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert got.dtype == torch.float32 and got.dim() == 0


@pytest.mark.parametrize("beta", [0.1, 0.7])
def test_jsd_reference_other_betas(beta):
    s, t, m = make(3)
    logq, logp = ref_logprobs(s.detach(), t)
    want = token_mean(ref_divergence("jsd", logq, logp, beta=beta), m)
    torch.testing.assert_close(L.generalized_jsd(s, t, m, beta=beta), want)


@pytest.mark.parametrize("name", ["skew_fkl", "skew_rkl"])
def test_skew_reference_other_alpha(name):
    s, t, m = make(4)
    logq, logp = ref_logprobs(s.detach(), t)
    want = token_mean(ref_divergence(name, logq, logp, alpha=0.4), m)
    torch.testing.assert_close(L.DIVERGENCES[name](s, t, m, alpha=0.4), want)


def test_topk_uniform_tail_matches_the_full_vocabulary_divergence_of_the_spread_teacher():
    # the teacher rebuilt over all V ids: its top-k probabilities, the rest of its mass split evenly
    s, t, m = make(5)
    k = 4
    top = topk_of(t, k, shuffle=True)
    p_top = top.logprobs.exp()
    p = ((1 - p_top.sum(-1, keepdim=True)) / (V - k)).expand(*p_top.shape[:-1], V).clone()
    p.scatter_(-1, top.ids, p_top)
    assert torch.allclose(p.sum(-1), torch.ones(()), atol=1e-5)
    for name in ALL_DIVS:
        got = L.DIVERGENCES[name](s, top, m)
        want = token_mean(ref_divergence(name, s.log_softmax(-1), p.log()), m)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
        (g,) = torch.autograd.grad(got, s)
        (g_ref,) = torch.autograd.grad(want, s)
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-6)


def test_topk_uniform_tail_sees_what_the_bucket_misses():
    # a student that puts its tail mass on one id outside the teacher's top-k: the bucket only compares
    # tail totals, so its loss is the same as for a student spreading the same mass; uniform is not blind
    k, v = 2, 6
    ids = torch.tensor([[[0, 1]]])
    lps = torch.tensor([[[0.5, 0.2]]]).log()  # tail 0.3
    peaked = torch.tensor([[[0.5, 0.2, 0.3, 0.0, 0.0, 0.0]]]).clamp(min=1e-9).log()
    spread = torch.tensor([[[0.5, 0.2, 0.075, 0.075, 0.075, 0.075]]]).log()
    m = torch.ones(1, 1, dtype=torch.bool)
    bucket = [L.forward_kl(x, TopK(ids, lps, "bucket"), m).item() for x in (peaked, spread)]
    uniform = [L.forward_kl(x, TopK(ids, lps, "uniform"), m).item() for x in (peaked, spread)]
    assert bucket[0] == pytest.approx(0, abs=1e-6) and bucket[1] == pytest.approx(0, abs=1e-6)
    assert uniform[1] == pytest.approx(0, abs=1e-6)  # the spread student is the uniform-tail teacher
    # KL(p || peaked) with p = 0.075 on ids 2..5 and peaked ~0 on ids 3..5: large
    assert uniform[0] > 1.0
    with pytest.raises(ValueError, match="tail"):
        TopK(ids, lps, "spread")


def test_topk_bucket_matches_explicit_k_plus_one_buckets():
    s, t, m = make(5)
    k = 4
    top = topk_of(t, k, shuffle=True, tail="bucket")
    lq_full = s.detach().log_softmax(-1)
    q_top = lq_full.gather(-1, top.ids).exp()
    q = torch.cat([q_top, 1 - q_top.sum(-1, keepdim=True)], -1)
    p_top = top.logprobs.exp()
    p = torch.cat([p_top, 1 - p_top.sum(-1, keepdim=True)], -1)
    for name in ALL_DIVS:
        want = token_mean(ref_divergence(name, q.log(), p.log()), m)
        torch.testing.assert_close(L.DIVERGENCES[name](s, top, m), want, rtol=1e-4, atol=1e-6)


def test_sft_matches_cross_entropy():
    s, _, m = make(6)
    labels = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(0))
    labels[~m] = -100  # masked labels are never read, even out of range
    want = F.cross_entropy(s.detach().reshape(-1, V), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(L.sft_loss(s, labels, m), want)
    torch.testing.assert_close(L.sft_loss(s, labels, m, chunk_size=None), want)


# ------------------------------------------------------------------------------------ properties


@pytest.mark.parametrize("name", ALL_DIVS)
def test_zero_for_identical_and_nonnegative(name):
    s, t, m = make(7)
    same = L.DIVERGENCES[name](s, s.detach().clone(), m)
    assert abs(same.item()) < 1e-6
    for seed in range(3):
        s2, t2, m2 = make(seed + 10)
        assert L.DIVERGENCES[name](s2, t2, m2).item() > 0
        assert L.DIVERGENCES[name](s2, topk_of(t2, 3), m2).item() > 0


def test_jsd_endpoints_are_forward_and_reverse_kl():
    s, t, m = make(8)
    torch.testing.assert_close(L.generalized_jsd(s, t, m, beta=0.0), L.forward_kl(s, t, m))
    torch.testing.assert_close(L.generalized_jsd(s, t, m, beta=1.0), L.reverse_kl(s, t, m))
    # the convention is TRL's: JSD_beta / beta -> forward KL as beta -> 0
    small = L.generalized_jsd(s, t, m, beta=1e-4) / 1e-4
    torch.testing.assert_close(small, L.forward_kl(s, t, m), rtol=2e-3, atol=1e-4)


def test_jsd_symmetric_at_half():
    a, b, m = make(9)
    b = b.requires_grad_()
    torch.testing.assert_close(L.generalized_jsd(a, b, m, beta=0.5), L.generalized_jsd(b, a, m, beta=0.5))


def test_skew_alpha_zero_is_plain_kl():
    s, t, m = make(10)
    torch.testing.assert_close(L.skew_forward_kl(s, t, m, alpha=0.0), L.forward_kl(s, t, m))
    torch.testing.assert_close(L.skew_reverse_kl(s, t, m, alpha=0.0), L.reverse_kl(s, t, m))


def test_tvd_bounded():
    s, t, m = make(11, scale=20.0)
    assert 0 < L.total_variation(s, t, m).item() <= 1


@pytest.mark.parametrize("name", ALL_DIVS)
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_topk_with_k_equal_v_equals_full(name, tau):
    s, t, m = make(12)
    full = L.DIVERGENCES[name](s, t, m, temperature=tau)
    g_full = torch.autograd.grad(full, s)[0]
    top = L.DIVERGENCES[name](s, topk_of(t, V, shuffle=True), m, temperature=tau)
    g_top = torch.autograd.grad(top, s)[0]
    torch.testing.assert_close(top, full, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_top, g_full, rtol=1e-4, atol=1e-6)


def test_num_tokens_is_the_denominator():
    s, t, m = make(13)
    n = int(m.sum())
    local = L.forward_kl(s, t, m)
    torch.testing.assert_close(L.forward_kl(s, t, m, num_tokens=2 * n), local / 2)
    torch.testing.assert_close(L.forward_kl(s, t, m, num_tokens=torch.tensor(4 * n)), local / 4)


def test_padding_is_never_read():
    s, t, m = make(14)
    base = L.reverse_kl(s, t, m)
    t2 = t.clone()
    t2[~m] = float("nan")
    s2 = s.detach().clone()
    s2[~m] = float("nan")
    s2.requires_grad_()
    got = L.reverse_kl(s2, t2, m)
    got.backward()
    torch.testing.assert_close(got, base)
    assert torch.isfinite(s2.grad).all() and (s2.grad[~m] == 0).all()


# ------------------------------------------------------------------------------------ chunking & masking


def token_loss_cases():
    s, t, m = make(15, b=3, t=7)
    labels = torch.randint(0, V, (3, 7), generator=torch.Generator().manual_seed(2))
    cases = {f"{n}-full": (L.DIVERGENCES[n], t) for n in ALL_DIVS}
    cases.update({f"{n}-top3": (L.DIVERGENCES[n], topk_of(t, 3)) for n in ALL_DIVS})
    cases["dpkd_token-full"] = (L.dpkd_token_loss, t)
    cases["dpkd_token-top3"] = (L.dpkd_token_loss, topk_of(t, 3))
    cases["sft"] = (L.sft_loss, labels)
    return s, m, cases


@pytest.mark.parametrize("chunk", [1, 4, 1000])
def test_chunked_equals_unchunked(chunk):
    s, m, cases = token_loss_cases()
    for name, (fn, teacher) in cases.items():
        ref = fn(s, teacher, m, chunk_size=None)
        (g_ref,) = torch.autograd.grad(ref * 3.0, s)  # a non-unit upstream gradient
        got = fn(s, teacher, m, chunk_size=chunk)
        (g_got,) = torch.autograd.grad(got * 3.0, s)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(g_got, g_ref, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("chunk", [None, 2])
def test_all_masked_gives_exact_zero_and_finite_grads(chunk):
    s, m, cases = token_loss_cases()
    none = torch.zeros_like(m)
    for name, (fn, teacher) in cases.items():
        loss = fn(s, teacher, none, chunk_size=chunk)
        (g,) = torch.autograd.grad(loss, s)
        assert loss.item() == 0.0, name
        assert torch.isfinite(g).all() and (g == 0).all(), name


def test_chunked_graph_holds_no_vocab_sized_intermediates():
    """The memory claim, checked in the autograd graph itself: once the chunked loss is computed, no tensor
    saved for backward is still alive except the inputs (each chunk's graph is freed with the chunk);
    the unchunked graph keeps several [N, V] tensors alive until backward."""
    n, v = 64, 512
    s, t, m = make(16, b=1, t=n, v=v)
    inputs = {s.untyped_storage().data_ptr(), t.untyped_storage().data_ptr()}

    def live_saved_bytes(chunk):
        refs = []

        def pack(x):
            refs.append(weakref.ref(x))
            return x

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            loss = L.reverse_kl(s, t, m, chunk_size=chunk)
        alive = [r() for r in refs if r() is not None]
        del loss
        return sum(x.untyped_storage().nbytes() for x in alive if x.untyped_storage().data_ptr() not in inputs)

    assert live_saved_bytes(8) < n * v  # far below even one fp32 [N, V] (4 * n * v bytes)
    assert live_saved_bytes(None) > 3 * 4 * n * v


def test_chunked_loss_backward_twice_through_retained_graph():
    s, t, m = make(24)
    loss = L.skew_reverse_kl(s, topk_of(t, 4), m, chunk_size=3) * 2.0
    (first,) = torch.autograd.grad(loss, s, retain_graph=True)  # the precomputed buffer
    (second,) = torch.autograd.grad(loss, s)  # recomputed chunk by chunk
    torch.testing.assert_close(first, second, rtol=0, atol=0)


def test_no_grad_and_constant_inputs_evaluate_chunked():
    s, t, m = make(25)
    want = L.forward_kl(s, t, m, chunk_size=None).item()
    with torch.no_grad():
        assert L.forward_kl(s, t, m, chunk_size=4).item() == pytest.approx(want, rel=1e-6)
    assert L.forward_kl(s.detach(), t, m, chunk_size=4).item() == pytest.approx(want, rel=1e-6)


def test_bf16_inputs_upcast_and_keep_grad_dtype():
    s, t, m = make(17)
    s16 = s.detach().bfloat16().requires_grad_()
    loss = L.forward_kl(s16, t.bfloat16(), m)
    loss.backward()
    assert loss.dtype == torch.float32 and s16.grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss, L.forward_kl(s16.detach().float(), t.bfloat16().float(), m))


# ------------------------------------------------------------------------------------ gradcheck


@pytest.mark.parametrize("name", ALL_DIVS)
@pytest.mark.parametrize("teacher_kind", ["full", "topk"])
def test_gradcheck_divergences(name, teacher_kind):
    s, t, m = make(18, b=1, t=3, v=5, dtype=torch.float64, scale=1.0)
    teacher = t if teacher_kind == "full" else topk_of(t, 2)
    fn = L.DIVERGENCES[name]
    tau = 1.5 if teacher_kind == "full" else 1.0  # tempered top-k is refused
    assert torch.autograd.gradcheck(lambda x: fn(x, teacher, m, temperature=tau, chunk_size=2), (s,))
    assert torch.autograd.gradcheck(lambda x: fn(x, teacher, m, chunk_size=None), (s,))


def test_gradcheck_dpkd_and_dpkd_token():
    g = torch.Generator().manual_seed(0)
    args = [torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    refs = [torch.randn(4, generator=g, dtype=torch.float64) for _ in range(2)]
    lengths = torch.tensor([3, 1, 0, 7]), torch.tensor([2, 5, 4, 0])
    assert torch.autograd.gradcheck(
        lambda a, b: L.dpkd_loss(a, b, *refs, *lengths, beta=0.5, label_smoothing=0.1)[0], tuple(args))
    # dpkd_token: argmaxes are piecewise constant; well-separated logits keep them fixed under gradcheck's
    # perturbation, so the check covers the differentiable part.
    s = torch.tensor([[[4.0, 0.0, 1.0, -1.0], [0.0, 3.0, 0.5, 2.0]]], dtype=torch.float64, requires_grad=True)
    t = torch.tensor([[[0.0, 4.0, 1.0, -1.0], [0.0, 3.0, 0.5, 2.0]]], dtype=torch.float64)
    m = torch.ones(1, 2, dtype=torch.bool)
    assert torch.autograd.gradcheck(lambda x: L.dpkd_token_loss(x, t, m, beta=0.7, chunk_size=1), (s,))


# ------------------------------------------------------------------------------------ DPKD


def test_dpkd_hand_computed():
    pc, pr = torch.tensor([-10.0]), torch.tensor([-20.0])
    rc, rr = torch.tensor([-8.0]), torch.tensor([-10.0])
    loss, chosen, rejected = L.dpkd_loss(pc, pr, rc, rr, torch.tensor([4]), torch.tensor([5]), beta=1.0)
    # z = (-10 + 8)/4 - (-20 + 10)/5 = -0.5 + 2 = 1.5
    assert loss.item() == pytest.approx(math.log1p(math.exp(-1.5)), rel=1e-6)
    assert chosen.item() == pytest.approx(-0.5) and rejected.item() == pytest.approx(-2.0)
    # without length normalisation z = -2 + 10 = 8, beta scales it
    loss, chosen, _ = L.dpkd_loss(pc, pr, rc, rr, torch.tensor([4]), torch.tensor([5]), beta=0.1,
                                  length_normalize=False)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-0.8)), rel=1e-6)
    assert chosen.item() == pytest.approx(-0.2)
    # conservative label smoothing
    loss, *_ = L.dpkd_loss(pc, pr, rc, rr, torch.tensor([4]), torch.tensor([5]), beta=1.0, label_smoothing=0.2)
    want = 0.8 * math.log1p(math.exp(-1.5)) + 0.2 * math.log1p(math.exp(1.5))
    assert loss.item() == pytest.approx(want, rel=1e-6)


def test_dpkd_sign_and_batch_mean():
    ref_c, ref_r = torch.tensor([-5.0, -6.0]), torch.tensor([-9.0, -9.0])
    lens = torch.tensor([5, 6]), torch.tensor([3, 3])
    # the student raises the teacher's output relative to the teacher, and lowers its own: loss < log 2
    good, _, _ = L.dpkd_loss(ref_c + 1, ref_r - 1, ref_c, ref_r, *lens)
    bad, _, _ = L.dpkd_loss(ref_c - 1, ref_r + 1, ref_c, ref_r, *lens)
    even, _, _ = L.dpkd_loss(ref_c, ref_r, ref_c, ref_r, *lens)
    assert good.item() < math.log(2) < bad.item()
    assert even.item() == pytest.approx(math.log(2))
    # the gradient raises log q(y_t) and lowers log q(y_s)
    pc, pr = ref_c.clone().requires_grad_(), ref_r.clone().requires_grad_()
    L.dpkd_loss(pc, pr, ref_c, ref_r, *lens)[0].backward()
    assert (pc.grad < 0).all() and (pr.grad > 0).all()


def test_dpkd_zero_lengths_and_empty_batch_are_finite():
    x = torch.tensor([-3.0, 0.0], requires_grad=True)
    loss, c, r = L.dpkd_loss(x, x * 2, torch.zeros(2), torch.zeros(2), torch.tensor([0, 0]), torch.tensor([0, 2]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all() and torch.isfinite(c).all()
    empty = torch.zeros(0)
    assert L.dpkd_loss(empty, empty, empty, empty, empty, empty)[0].item() == 0.0


def test_dpkd_token_hand_computed_and_agreement():
    beta = 0.5
    s = torch.tensor([[[2.0, 1.0, 0.0], [0.0, 3.0, 1.0]]], requires_grad=True)
    t = torch.tensor([[[0.0, 2.0, 1.0], [0.5, 2.0, 0.0]]])
    m = torch.ones(1, 2, dtype=torch.bool)
    lq, lp = s.detach().log_softmax(-1), t.log_softmax(-1)
    # position 0: teacher argmax 1, student argmax 0; position 1: both 1 -> h = 0 -> log 2
    h0 = (lq[0, 0, 1] - lp[0, 0, 1]) - (lq[0, 0, 0] - lp[0, 0, 0])
    want = (-F.logsigmoid(beta * h0) + math.log(2)) / 2
    got = L.dpkd_token_loss(s, t, m, beta=beta)
    torch.testing.assert_close(got, want)
    got.backward()
    assert (s.grad[0, 1] == 0).all()  # agreeing positions carry no gradient
    assert s.grad[0, 0, 1] < 0 < s.grad[0, 0, 0]  # raise the teacher's token, lower the student's own
    # TopK with k = V is the same loss
    torch.testing.assert_close(L.dpkd_token_loss(s, topk_of(t, 3, shuffle=True), m, beta=beta), want)


def test_dpkd_token_topk_student_argmax_outside_uses_upper_bound():
    s = torch.tensor([[[0.0, 0.0, 0.0, 5.0]]], requires_grad=True)  # student argmax 3
    lp_full = torch.tensor([[[0.0, 1.0, 2.0, -1.0]]]).log_softmax(-1)
    top = topk_of(lp_full, 2)  # ids {2, 1}: the student's argmax is outside
    m = torch.ones(1, 1, dtype=torch.bool)
    lq = s.detach().log_softmax(-1)
    tail = 1 - top.logprobs.exp().sum()
    bound = torch.minimum(top.logprobs.min(), tail.log())
    h = (lq[0, 0, 2] - lp_full[0, 0, 2]) - (lq[0, 0, 3] - bound)
    torch.testing.assert_close(L.dpkd_token_loss(s, top, m, beta=0.1), -F.logsigmoid(0.1 * h))
    assert bound >= lp_full[0, 0, 3]  # it is an upper bound on the true log p(a_s)


# ------------------------------------------------------------------------------------ pg_rkl


def pg_inputs():
    g = torch.Generator().manual_seed(3)
    student = (-torch.rand(2, 4, generator=g) * 3).requires_grad_()
    teacher = -torch.rand(2, 4, generator=g) * 3
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    return student, teacher, mask


def test_pg_on_policy_gradient_is_minus_reward():
    s, t, m = pg_inputs()
    loss, stats = L.reverse_kl_policy_gradient(s, s.detach(), t, m)
    r = (t - s.detach()) * m
    torch.testing.assert_close(loss, -r.sum() / m.sum())
    loss.backward()
    torch.testing.assert_close(s.grad, -r / m.sum())
    torch.testing.assert_close(stats["reverse_kl"], -r.sum() / m.sum())
    assert stats["clip_frac"].item() == 0.0 and stats["ratio_mean"].item() == pytest.approx(1.0)


def test_pg_ratio_clipping():
    eps = 0.2
    m = torch.ones(1, 4, dtype=torch.bool)
    teacher = torch.tensor([[0.0, -9.0, 0.0, -9.0]])  # A > 0 at 0 and 2, A < 0 at 1 and 3
    student = torch.tensor([[-1.0, -1.0, -1.0, -1.0]], requires_grad=True)
    # ratios exp(+0.5), exp(-0.5), exp(-0.5), exp(+0.5): outside [0.8, 1.2] everywhere
    behaviour = torch.tensor([[-1.5, -0.5, -0.5, -1.5]])
    loss, stats = L.reverse_kl_policy_gradient(student, behaviour, teacher, m, clip_ratio=eps)
    loss.backward()
    g = student.grad[0]
    # A > 0 with rho > 1 + eps, and A < 0 with rho < 1 - eps: clipped, no gradient
    assert g[0] == 0 and g[1] == 0
    # A > 0 with rho < 1 - eps, and A < 0 with rho > 1 + eps: the unclipped (pessimistic) branch
    assert g[2] < 0 < g[3]
    assert stats["clip_frac"].item() == pytest.approx(0.5)
    rho = (student.detach() - behaviour).exp()
    adv = teacher - student.detach()
    want = -torch.minimum(rho * adv, rho.clamp(1 - eps, 1 + eps) * adv).mean()
    torch.testing.assert_close(loss, want)


def test_pg_discounted_future_rewards_and_padding():
    s, t, m = pg_inputs()
    r = (t - s.detach()) * m
    loss, stats = L.reverse_kl_policy_gradient(s, s.detach(), t, m, gamma=1.0)
    future = r.flip(-1).cumsum(-1).flip(-1)
    torch.testing.assert_close(loss, -(future * m).sum() / m.sum())
    torch.testing.assert_close(stats["advantage_mean"], (future * m).sum() / m.sum())
    s_nan = s.detach().clone()
    s_nan[~m] = float("nan")
    s_nan.requires_grad_()
    loss2, _ = L.reverse_kl_policy_gradient(s_nan, s_nan.detach(), t, m, gamma=0.9)
    loss2.backward()
    assert torch.isfinite(loss2) and torch.isfinite(s_nan.grad).all()
    none, _ = L.reverse_kl_policy_gradient(s, s.detach(), t, torch.zeros_like(m))
    assert none.item() == 0.0


# ------------------------------------------------------------------------------------ temperature


@pytest.mark.parametrize("name", ALL_DIVS)
def test_temperature_divides_both_logits(name):
    s, t, m = make(19)
    tau = 3.0
    got = L.DIVERGENCES[name](s, t, m, temperature=tau)
    torch.testing.assert_close(got, L.DIVERGENCES[name](s / tau, t / tau, m), rtol=1e-5, atol=1e-7)


def test_high_temperature_flattens_towards_zero():
    s, t, m = make(20)
    values = [L.forward_kl(s, t, m, temperature=tau).item() for tau in (1.0, 4.0, 64.0)]
    assert values[0] > values[1] > values[2] and values[2] < 1e-3


@pytest.mark.parametrize("name", ALL_DIVS)
def test_topk_with_temperature_is_refused(name):
    """A tempered top-k divergence is a different objective (the tail's inner distribution is unknown),
    not an approximation: refused, while k == V (no tail) and tau == 1 stay allowed."""
    s, t, m = make(21)
    with pytest.raises(ValueError, match=r"temperature=2.0 with a top-k teacher \(k=3 < V=11\).*temperature=1"):
        L.DIVERGENCES[name](s, topk_of(t, 3), m, temperature=2.0)
    L.DIVERGENCES[name](s, topk_of(t, 3), m, temperature=1.0)
    L.DIVERGENCES[name](s, topk_of(t, V), m, temperature=2.0)


def test_topk_zero_tail_stays_finite():
    """A confident teacher whose top-k already sums to 1 (vLLM reports logprob 0.0): the tail bucket is
    zero, and reverse KL must stay finite with finite gradients."""
    s, _, m = make(22)
    ids = torch.arange(2).expand(B, T, 2).contiguous()
    lps = torch.tensor([0.0, -30.0]).expand(B, T, 2).contiguous()
    for name in ALL_DIVS:
        loss = L.DIVERGENCES[name](s, TopK(ids, lps), m)
        (g,) = torch.autograd.grad(loss, s)
        assert torch.isfinite(loss) and torch.isfinite(g).all(), name


# ------------------------------------------------------------------------------------ registry & errors


def test_registry():
    assert set(L.DIVERGENCES) <= set(L.LOSS_TYPES)
    assert len(L.LOSS_TYPES) == len(set(L.LOSS_TYPES)) == 10
    assert L.get_divergence("jsd") is L.generalized_jsd
    with pytest.raises(ValueError, match="allowed: fkl"):
        L.get_divergence("kl")


def test_bad_inputs_fail_fast_with_a_clear_message():
    s, t, m = make(23)
    with pytest.raises(ValueError, match="mask shape"):
        L.forward_kl(s, t, m[:, :-1])
    with pytest.raises(ValueError, match="teacher logits"):
        L.forward_kl(s, t[..., :-1], m)
    with pytest.raises(ValueError, match="TopK"):
        L.forward_kl(s, TopK(torch.zeros(B, T, 3, dtype=torch.long), torch.zeros(B, T, 2)), m)
    with pytest.raises(ValueError, match="beta"):
        L.generalized_jsd(s, t, m, beta=1.5)
    with pytest.raises(ValueError, match="temperature"):
        L.forward_kl(s, t, m, temperature=0.0)
    with pytest.raises(ValueError, match="chunk_size"):
        L.forward_kl(s, t, m, chunk_size=0)
    with pytest.raises(ValueError, match="labels"):
        L.sft_loss(s, torch.full((B, T), V), m)


# ------------------------------------------------------------------------------------ non-finite inputs

LOG_TINY = math.log(torch.finfo(torch.float32).tiny)


def student_with_minus_inf(seed=26):
    """Student logits with -inf entries (a banned token), at the teacher's argmax too; and the same
    logits with -1e4 there: exp(-1e4) is exactly 0, so that tensor is the finite limit to compare to."""
    s, t, m = make(seed)
    x = s.detach().clone()
    x[0, 0, t[0, 0].argmax()] = float("-inf")
    x[1, 2, :4] = float("-inf")
    limit = x.clone()
    limit[torch.isinf(x)] = -1e4
    return x.requires_grad_(), limit.requires_grad_(), t, m


@pytest.mark.parametrize("name", ["rkl", "jsd", "skew_rkl", "skew_fkl", "tvd"])
@pytest.mark.parametrize("teacher_kind", ["full", "topk"])
def test_minus_inf_student_logit_gives_the_limit(name, teacher_kind):
    """These divergences are finite when q has zeros; a -inf logit must give that value and its gradient
    (zero at the -inf entries), computed here by the plain reference on the -1e4 limit."""
    x, limit, t, m = student_with_minus_inf()
    if teacher_kind == "full":
        got = L.DIVERGENCES[name](x, t, m)
        want = token_mean(ref_divergence(name, *ref_logprobs(limit, t)), m)
    else:
        top = topk_of(t, 4, tail="bucket")
        got = L.DIVERGENCES[name](x, top, m)
        q_top = limit.log_softmax(-1).gather(-1, top.ids).exp()
        q = torch.cat([q_top, (1 - q_top.sum(-1, keepdim=True)).clamp(min=0)], -1)
        p_top = top.logprobs.exp()
        p = torch.cat([p_top, 1 - p_top.sum(-1, keepdim=True)], -1)
        # explicit sums over the k+1 outcomes, with 0 * log 0 = 0
        lq, lp = q.log(), p.log()
        per = {"rkl": lambda: torch.special.xlogy(q, q).sum(-1) - (q * lp).sum(-1),
               "tvd": lambda: 0.5 * (p - q).abs().sum(-1)}
        ref = per[name]() if name in per else ref_divergence(name, lq.clamp(min=-1e4), lp)
        want = token_mean(ref, m)
    (g,) = torch.autograd.grad(got, x)
    assert torch.isfinite(got) and torch.isfinite(g).all()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    if teacher_kind == "full":
        (g_ref,) = torch.autograd.grad(token_mean(ref_divergence(name, *ref_logprobs(limit, t)), m), limit)
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-6)
        assert (g[torch.isinf(x)] == 0).all()


@pytest.mark.parametrize("teacher_kind", ["full", "topk"])
def test_minus_inf_student_logit_in_forward_kl_is_floored(teacher_kind):
    """Forward KL is +inf when q is 0 where p is not: the floor makes it p * (log p - log tiny)."""
    x, _, t, m = student_with_minus_inf()
    teacher = t if teacher_kind == "full" else topk_of(t, V)
    got = L.forward_kl(x, teacher, m)
    (g,) = torch.autograd.grad(got, x)
    lq, lp = F.log_softmax(x.detach(), -1).clamp(min=LOG_TINY), F.log_softmax(t, -1)
    want = token_mean((lp.exp() * (lp - lq)).sum(-1), m)
    assert torch.isfinite(got) and torch.isfinite(g).all()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("teacher_kind", ["full", "topk"])
def test_minus_inf_student_logit_in_dpkd_token(teacher_kind):
    """The student rules out the teacher's argmax: log q(a_t) is floored, the loss and gradient finite."""
    s = torch.tensor([[[float("-inf"), 1.0, 0.0, -1.0]]], requires_grad=True)
    t = torch.tensor([[[3.0, 0.0, 1.0, -2.0]]])
    m = torch.ones(1, 1, dtype=torch.bool)
    teacher = t if teacher_kind == "full" else topk_of(t, 4)
    got = L.dpkd_token_loss(s, teacher, m, beta=0.5)
    (g,) = torch.autograd.grad(got, s)
    lq, lp = F.log_softmax(s.detach(), -1), F.log_softmax(t, -1)
    h = (LOG_TINY - lp[0, 0, 0]) - (lq[0, 0, 1] - lp[0, 0, 1])  # a_t = 0, a_s = 1
    torch.testing.assert_close(got, -F.logsigmoid(0.5 * h), rtol=1e-5, atol=1e-5)
    assert torch.isfinite(g).all() and g[0, 0, 0] == 0


def test_minus_inf_teacher_logprob_in_dpkd():
    """A -inf teacher log-prob makes the reference sum -inf: floored at len * log(tiny), finite."""
    pc = torch.tensor([-4.0, -6.0], requires_grad=True)
    pr = torch.tensor([-5.0, -3.0], requires_grad=True)
    rc, rr = torch.tensor([float("-inf"), -5.0]), torch.tensor([-4.0, float("-inf")])
    lc, lr = torch.tensor([2, 3]), torch.tensor([4, 1])
    loss, chosen, rejected = L.dpkd_loss(pc, pr, rc, rr, lc, lr, beta=0.1)
    loss.backward()
    rc_f, rr_f = torch.tensor([2 * LOG_TINY, -5.0]), torch.tensor([-4.0, LOG_TINY])
    z = 0.1 * ((pc.detach() - rc_f) / lc - (pr.detach() - rr_f) / lr)
    torch.testing.assert_close(loss, -F.logsigmoid(z).mean())
    sig = torch.sigmoid(-z)  # d/dz -log sigmoid(z) = -sigmoid(-z)
    torch.testing.assert_close(pc.grad, -sig * 0.1 / lc / 2)
    torch.testing.assert_close(pr.grad, sig * 0.1 / lr / 2)
    assert torch.isfinite(chosen).all() and torch.isfinite(rejected).all()


def test_minus_inf_teacher_logprob_in_pg_rkl():
    s, t, m = pg_inputs()
    t = t.clone()
    t[0, 1] = float("-inf")
    loss, stats = L.reverse_kl_policy_gradient(s, s.detach(), t, m)
    loss.backward()
    r = torch.where(m, t.clamp(min=LOG_TINY) - s.detach(), 0.0)
    torch.testing.assert_close(loss, -r.sum() / m.sum())
    torch.testing.assert_close(s.grad, -r / m.sum())  # on-policy: the gradient is minus the reward
    assert all(torch.isfinite(v) for v in stats.values())
