"""kd.objective: batching layout; every term's value, gradient, weight and sequences against formulas
written here with plain torch on unpadded per-row forwards; data-parallel normalisation; non-finite
teacher log-probs; the method defaults and what each loss needs from the rows."""

import math

import pyarrow as pa
import pytest
import torch

from driver.config import LossConfig
from kd import losses as L
from kd.data import BUFFER_SCHEMA
from kd.models import make_tiny_model
import torch.nn.functional as F

from kd.objective import (METHOD_DEFAULTS, compute_loss, loss_needs, pack, resolve_loss, response_logits,
                          student_rows, teacher_pools, token_counts, token_logps)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    path = make_tiny_model(tmp_path_factory.mktemp("m") / "tiny", num_layers=2, seed=0)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def table(n=4, seed=0, k=3, offline=False):
    g = torch.Generator().manual_seed(seed)

    def seq(lo, hi):
        return torch.randint(3, 400, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()

    chosen = [seq(2, 7) for _ in range(n)]
    rejected = [seq(1, 6) for _ in range(n)]
    lps = lambda s: (-torch.rand(len(s), generator=g) * 3).tolist()  # noqa: E731
    topk = lambda s: [sorted(torch.randperm(400, generator=g)[:k].tolist()) for _ in s]  # noqa: E731
    # a valid top-k: the k largest of a distribution over k+1 outcomes, so the tail mass is > 0
    topl = lambda s: [sorted(torch.randn(k + 1, generator=g).log_softmax(-1)[:k].tolist(), reverse=True)  # noqa: E731
                      for _ in s]
    if offline:  # what `raykd generate` writes: no student sample
        rejected = [[] for _ in range(n)]
    return pa.Table.from_pydict({
        "prompt_id": [str(i) for i in range(n)],
        "prompt_ids": [seq(2, 9) for _ in range(n)], "teacher_prompt_ids": [[1]] * n,
        "chosen_ids": chosen, "rejected_ids": rejected,
        "chosen_teacher_logps": [lps(s) for s in chosen], "rejected_teacher_logps": [lps(s) for s in rejected],
        "chosen_topk_ids": [topk(s) for s in chosen], "chosen_topk_logps": [topl(s) for s in chosen],
        "rejected_topk_ids": [topk(s) for s in rejected], "rejected_topk_logps": [topl(s) for s in rejected],
        "rejected_behaviour_logps": [lps(s) for s in rejected], "policy_version": [-1 if offline else 0] * n,
        "priming": ["none"] * n, "created_at": [1.7e9 + i for i in range(n)], "reference_answer": [None] * n, "teacher_name": [None] * n,
        "chosen_teacher_logp_sum": [None] * n, "rejected_teacher_logp_sum": [None] * n,
    }, schema=BUFFER_SCHEMA)


def test_pack_aligns_every_response_at_the_same_column():
    s = pack([[5, 6, 7], [8]], [[1, 2], [3, 4, 9]], pad_id=0)
    assert s.prompt_width == 3
    assert s.input_ids.tolist() == [[5, 6, 7, 1, 2, 0], [0, 0, 8, 3, 4, 9]]
    assert s.resp_mask.tolist() == [[1, 1, 0], [1, 1, 1]]
    assert s.position_ids[1].tolist()[2:] == [0, 1, 2, 3]


def test_response_logits_equal_unpadded_forward(model):
    prompts, resps = [[5, 6, 7], [8]], [[10, 11], [12, 13, 14]]
    s = pack(prompts, resps, pad_id=0)
    lp = token_logps(response_logits(model, s), s.resp_ids)
    for i, (p, r) in enumerate(zip(prompts, resps)):
        full = model(input_ids=torch.tensor([p + r])).logits[0].log_softmax(-1)
        ref = full[len(p) - 1 : len(p) + len(r) - 1].gather(-1, torch.tensor(r)[:, None]).squeeze(-1)
        torch.testing.assert_close(lp[i, : len(r)], ref, atol=1e-5, rtol=1e-5)


def test_paired_response_logits_equal_each_sequence_alone_with_gradients(model):
    """Rows 2i and 2i+1 share a prompt (y_t and y_s of one buffer row): running that prompt once
    gives, for every sequence, the log-probs and the parameter gradient of running each sequence
    unpadded on its own (prompts of different lengths, so left padding is exercised)."""
    from kd.objective import paired_response_logits

    prompts, resps = [[5, 6, 7, 9], [8, 4]], [[10, 11], [12, 13, 14], [15], [16, 17, 18, 19]]
    pairs = [prompts[i // 2] for i in range(4)]
    s = pack(pairs, resps, pad_id=0)
    model.zero_grad()
    lp = token_logps(paired_response_logits(model, s), s.resp_ids)
    (lp * s.resp_mask).sum().backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    total = 0.0
    for i, (p, r) in enumerate(zip(pairs, resps)):
        full = model(input_ids=torch.tensor([p + r])).logits[0].log_softmax(-1)
        ref = full[len(p) - 1 : len(p) + len(r) - 1].gather(-1, torch.tensor(r)[:, None]).squeeze(-1)
        torch.testing.assert_close(lp[i, : len(r)].detach(), ref.detach(), atol=1e-5, rtol=1e-5)
        total = total + ref.sum()
    total.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(got[n], p.grad, atol=1e-5, rtol=1e-4, msg=lambda m, n=n: f"{n}: {m}")
    model.zero_grad()




# ------------------------------------------------------------------------------------ references
# Written from the formulas with plain torch, row by row on UNPADDED sequences: no code of kd.objective.

LOG_TINY = math.log(torch.finfo(torch.float32).tiny)


def row_logits(model, prompt, resp):
    """Student logits [len(resp), V] predicting each response token, from a forward without padding."""
    return model(input_ids=torch.tensor([prompt + resp])).logits[0, len(prompt) - 1 : len(prompt) + len(resp) - 1]


def ref_ce(model, t):
    """Token mean of cross-entropy on y_t over the whole batch."""
    rows = t.to_pylist()
    logits = torch.cat([row_logits(model, r["prompt_ids"], r["chosen_ids"]) for r in rows])
    return F.cross_entropy(logits, torch.tensor([x for r in rows for x in r["chosen_ids"]]))


def ref_rewards(model, t, beta=0.1):
    """Per row: (chosen reward, rejected reward) = beta/|y| * (log q(y) - log p(y)), from unpadded forwards."""
    out = []
    for r in t.to_pylist():
        terms = []
        for ids, ref in ((r["chosen_ids"], r["chosen_teacher_logps"]), (r["rejected_ids"], r["rejected_teacher_logps"])):
            lq = row_logits(model, r["prompt_ids"], ids).log_softmax(-1)[torch.arange(len(ids)), torch.tensor(ids)].sum()
            lp = torch.tensor(ref).clamp(min=LOG_TINY).sum()
            terms.append(beta / len(ids) * (lq - lp))
        out.append(terms)
    return out


def ref_dpkd(model, t, beta=0.1):
    """-log sigmoid(beta/|y_t| log(q(y_t)/p(y_t)) - beta/|y_s| log(q(y_s)/p(y_s))), batch mean."""
    return -F.logsigmoid(torch.stack([c - r for c, r in ref_rewards(model, t, beta)])).mean()


def ref_divergence_sum(kind, logits, ids, lps, tail="uniform"):
    """Sum over positions of the divergence: over the whole vocabulary against the teacher's top-k with
    its tail mass split evenly over the other ids ("uniform"), or over the k+1 outcomes, the top-k ids
    and the tail ("bucket")."""
    p_top = torch.tensor(lps).exp()
    if tail == "uniform":
        q = logits.softmax(-1)
        vocab, k = q.shape[-1], p_top.shape[-1]
        p = ((1 - p_top.sum(-1, keepdim=True)) / (vocab - k)).expand(-1, vocab).clone()
        p.scatter_(-1, torch.tensor(ids), p_top)
    else:
        q_top = logits.softmax(-1).gather(-1, torch.tensor(ids))
        q = torch.cat([q_top, 1 - q_top.sum(-1, keepdim=True)], -1)
        p = torch.cat([p_top, 1 - p_top.sum(-1, keepdim=True)], -1)
    if kind == "fkl":
        return (p * (p.log() - q.log())).sum()
    assert kind == "rkl"
    return (q * (q.log() - p.log())).sum()


def ref_divergence(model, t, kind, on_student, tail="uniform"):
    """Token mean of the divergence, each row on y_s where on_student[i] else on y_t, with that side's
    teacher top-k; one denominator: the tokens of the sequences used."""
    total, tokens = 0.0, 0
    for r, s in zip(t.to_pylist(), on_student):
        side = "rejected" if s else "chosen"
        logits = row_logits(model, r["prompt_ids"], r[f"{side}_ids"])
        total = total + ref_divergence_sum(kind, logits, r[f"{side}_topk_ids"], r[f"{side}_topk_logps"], tail)
        tokens += len(r[f"{side}_ids"])
    return total / tokens


def assert_same_value_and_grads(model, got, want):
    params = [p for p in model.parameters() if p.requires_grad]
    g_got = torch.autograd.grad(got, params, retain_graph=True)
    g_want = torch.autograd.grad(want, params)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------ values, gradients, weights


def test_dpkd_matches_a_direct_computation(model):
    t = table()
    loss, metrics = compute_loss(model, t, LossConfig(type="dpkd", kd_coef=1.0, sft_coef=0.0), pad_id=0)
    assert_same_value_and_grads(model, loss, ref_dpkd(model, t))
    assert "sft_loss" not in metrics  # a zero weight computes no term


@pytest.mark.parametrize("kind, ratio, main", [("dpkd", None, ref_dpkd),
                                               ("rkl", 1.0, lambda m, t: ref_divergence(m, t, "rkl", [True] * 4)),
                                               ("fkl", 0.0, lambda m, t: ref_divergence(m, t, "fkl", [False] * 4))])
def test_each_term_has_its_weight(model, kind, ratio, main):
    """kd_coef=0.3, sft_coef=0.7: the loss is 0.3 * main + 0.7 * CE(y_t), in value and gradient."""
    t = table()
    loss, metrics = compute_loss(model, t, LossConfig(type=kind, kd_coef=0.3, sft_coef=0.7, student_ratio=ratio),
                                 pad_id=0)
    assert_same_value_and_grads(model, loss, 0.3 * main(model, t) + 0.7 * ref_ce(model, t))
    assert metrics["sft_loss"] == pytest.approx(ref_ce(model, t).item(), rel=1e-5)


@pytest.mark.parametrize("kind, want", [
    ("dpkd", lambda m, t: 0.5 * ref_dpkd(m, t) + 0.5 * ref_ce(m, t)),  # the LMOps code's mixing
    ("fkl", lambda m, t: ref_divergence(m, t, "fkl", [False] * 4)),  # supervised KD on y_t, no SFT
    ("rkl", lambda m, t: ref_divergence(m, t, "rkl", [True] * 4)),  # on-policy, no SFT
    ("sft", ref_ce),
])
def test_method_defaults(model, kind, want):
    loss, _ = compute_loss(model, table(), LossConfig(type=kind), pad_id=0)
    assert_same_value_and_grads(model, loss, want(model, table()))


@pytest.mark.parametrize("tail", ["uniform", "bucket"])
@pytest.mark.parametrize("kind", ["fkl", "rkl"])
@pytest.mark.parametrize("ratio", [0.0, 0.5, 1.0])
def test_student_ratio_picks_the_sequences(model, kind, ratio, tail):
    """0: every row's divergence on y_t; 1: on y_s; in between: on the selected rows' y_s and the
    others' y_t, each with its side's top-k (its tail as loss.topk_tail says), normalised by the
    tokens of the sequences used."""
    t = table(n=8, seed=3)
    cfg = LossConfig(type=kind, student_ratio=ratio, topk_tail=tail)
    picked = student_rows(t, cfg)
    if ratio == 0.5:
        assert 0 < sum(picked) < len(picked)  # the test table really mixes both
    else:
        assert picked == [ratio == 1.0] * 8
    loss, metrics = compute_loss(model, t, cfg, pad_id=0)
    assert_same_value_and_grads(model, loss, ref_divergence(model, t, kind, picked, tail))
    assert metrics["student_rows"] == pytest.approx(sum(picked) / 8)
    lens = {s: [len(x) for x in t.column(f"{s}_ids").to_pylist()] for s in ("chosen", "rejected")}
    assert token_counts(t, cfg)["divergence"] == sum(lens["rejected"][i] if p else lens["chosen"][i]
                                                     for i, p in enumerate(picked))


def test_row_selection_is_stable_and_has_the_right_rate():
    """The draw depends only on the row (prompt_id, created_at): the same in any batch, any order, on any
    rank; and about student_ratio of the rows over many."""
    t = table(n=400, seed=4)
    cfg = LossConfig(type="jsd", student_ratio=0.3)
    picked = student_rows(t, cfg)
    assert abs(sum(picked) / 400 - 0.3) < 0.08
    order = list(range(399, -1, -3))
    assert student_rows(t.take(order), cfg) == [picked[i] for i in order]
    assert student_rows(t, LossConfig(type="jsd", student_ratio=0.0)) == [False] * 400
    assert student_rows(t, LossConfig(type="jsd", student_ratio=1.0)) == [True] * 400


CASES = [("dpkd", {}), ("fkl", {}), ("sft", {}), ("pg_rkl", {}), ("dpkd_token", {}), ("jsd", {}),
         ("jsd", {"sft_coef": 0.5}), ("rkl", {"student_ratio": 0.5, "sft_coef": 0.5}), ("fkl", {"student_ratio": 0.5})]


@pytest.mark.parametrize("kind, extra", CASES)
def test_two_ranks_take_the_same_step_as_one(model, kind, extra):
    """Global normalisation: (grad rank0 + grad rank1) / 2 (DeepSpeed's average) == grad of the whole,
    also when each rank's rows mix y_s and y_t (the counts come from the same token_counts the learner
    all-reduces)."""
    t = table(n=6, seed=1)
    cfg = LossConfig(type=kind, **extra)
    if extra.get("student_ratio") == 0.5:
        picked = student_rows(t, cfg)
        assert 0 < sum(picked[0::2]) < 3 or 0 < sum(picked[1::2]) < 3  # a rank really mixes

    def grads(tab, **kw):
        model.zero_grad()
        loss, _ = compute_loss(model, tab, cfg, pad_id=0, **kw)
        loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    whole = grads(t)
    parts = [t.take(list(range(r, 6, 2))) for r in range(2)]
    summed = {k: sum(token_counts(p, cfg)[k] for p in parts) for k in token_counts(t, cfg)}
    assert summed == token_counts(t, cfg)  # what the learner's all-reduce gives
    ranks = [grads(p, counts=summed, world_size=2) for p in parts]
    for w, a, b in zip(whole, *ranks):
        torch.testing.assert_close((a + b) / 2, w, atol=1e-5, rtol=1e-4)


def test_token_counts():
    t = table(n=5, seed=6)
    chosen = sum(len(x) for x in t.column("chosen_ids").to_pylist())
    rejected = sum(len(x) for x in t.column("rejected_ids").to_pylist())
    assert token_counts(t, LossConfig(type="dpkd")) == {"pairs": 5, "chosen": chosen, "rejected": rejected,
                                                        "divergence": chosen}
    assert token_counts(t, LossConfig(type="rkl"))["divergence"] == rejected
    assert token_counts(t, LossConfig(type="fkl"))["divergence"] == chosen


# ------------------------------------------------------------------------------------ rows, errors, non-finite


def test_token_loss_without_topk_is_a_clear_error(model):
    t = table().drop_columns(["rejected_topk_ids"]).append_column(
        pa.field("rejected_topk_ids", pa.list_(pa.list_(pa.int32()))), pa.array([None] * 4,
                                                                                 pa.list_(pa.list_(pa.int32()))))
    with pytest.raises(ValueError, match="top_k_logprobs"):
        compute_loss(model, t, LossConfig(type="fkl", student_ratio=1.0), pad_id=0)


@pytest.mark.parametrize("cfg", [LossConfig(type="dpkd"), LossConfig(type="pg_rkl"),
                                 LossConfig(type="rkl"), LossConfig(type="fkl", student_ratio=0.5)])
def test_rows_without_student_samples_are_a_clear_error(model, cfg):
    with pytest.raises(ValueError, match=r"needs the student's samples y_s .* 4 rows have none"):
        compute_loss(model, table(offline=True), cfg, pad_id=0)


def test_offline_rows_serve_the_teacher_side_losses(model):
    t = table(offline=True)
    for cfg in (LossConfig(type="fkl"), LossConfig(type="sft"), LossConfig(type="dpkd_token")):
        loss, _ = compute_loss(model, t, cfg, pad_id=0)
        assert torch.isfinite(loss)
    loss, _ = compute_loss(model, t, LossConfig(type="fkl"), pad_id=0)
    assert_same_value_and_grads(model, loss, ref_divergence(model, t, "fkl", [False] * 4))


def with_minus_inf(t, column):
    rows = t.column(column).to_pylist()
    rows[1] = [float("-inf")] + rows[1][1:]
    return t.set_column(t.schema.get_field_index(column), column, pa.array(rows, t.schema.field(column).type))


@pytest.mark.parametrize("column", ["chosen_teacher_logps", "rejected_teacher_logps"])
def test_minus_inf_teacher_logprob_in_dpkd_is_floored(model, column):
    t = with_minus_inf(table(), column)
    loss, metrics = compute_loss(model, t, LossConfig(type="dpkd", kd_coef=1.0, sft_coef=0.0), pad_id=0)
    assert math.isfinite(metrics["reward_margin"])
    assert_same_value_and_grads(model, loss, ref_dpkd(model, t))  # the reference floors each token


def test_minus_inf_teacher_logprob_in_pg_rkl_is_finite(model):
    t = with_minus_inf(table(), "rejected_teacher_logps")
    model.zero_grad()
    loss, metrics = compute_loss(model, t, LossConfig(type="pg_rkl"), pad_id=0)
    loss.backward()
    assert torch.isfinite(loss) and math.isfinite(metrics["reverse_kl"])
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


# ------------------------------------------------------------------------------------ defaults and needs


def test_resolve_loss_fills_only_what_is_unset():
    assert set(METHOD_DEFAULTS) == set(L.LOSS_TYPES)
    r = resolve_loss(LossConfig(type="dpkd"))
    assert (r.kd_coef, r.sft_coef, r.student_ratio) == (0.5, 0.5, None)
    r = resolve_loss(LossConfig(type="jsd", sft_coef=0.2))
    assert (r.kd_coef, r.sft_coef, r.student_ratio) == (1.0, 0.2, 1.0)
    assert resolve_loss(r) == r
    assert resolve_loss(LossConfig(type="fkl")).student_ratio == 0.0
    assert (resolve_loss(LossConfig(type="sft")).kd_coef, resolve_loss(LossConfig(type="sft")).sft_coef) == (0, 1)
    with pytest.raises(ValueError, match="divergences only"):
        resolve_loss(LossConfig(type="dpkd", student_ratio=0.5))


@pytest.mark.parametrize("cfg, y_t, scores_t, y_s, topk", [
    (LossConfig(type="dpkd"), True, True, True, False),
    (LossConfig(type="dpkd", sft_coef=0.0), True, True, True, False),
    (LossConfig(type="dpkd_token"), True, True, False, True),
    (LossConfig(type="sft"), True, False, False, False),
    (LossConfig(type="pg_rkl"), False, False, True, False),
    (LossConfig(type="pg_rkl", sft_coef=0.5), True, False, True, False),
    (LossConfig(type="jsd"), False, False, True, True),  # on-policy, no SFT: no teacher generation
    (LossConfig(type="jsd", sft_coef=0.1), True, False, True, True),
    (LossConfig(type="fkl"), True, True, False, True),
    (LossConfig(type="rkl", student_ratio=0.5), True, True, True, True),
])
def test_loss_needs(cfg, y_t, scores_t, y_s, topk):
    assert loss_needs(cfg) == {"y_t": y_t, "teacher_scores_y_t": scores_t, "y_s": y_s,
                               "teacher_scores_y_s": y_s, "teacher_topk": topk}


# ------------------------------------------------------------------------------------ metrics by teacher pool

NAMES = ["a", "b", "a", "a", "b", None, "b"]  # two pools and one row from before teacher_name was kept


def pooled(n=7, seed=5, **kw):
    t = table(n=n, seed=seed, **kw)
    return t.set_column(t.schema.get_field_index("teacher_name"), "teacher_name", pa.array(NAMES[:n], pa.string()))


def ratios(sums):
    return {k: s / c for k, (s, c) in sums.items()}


def test_teacher_pools():
    assert teacher_pools(pooled()) == ["a", "b"]
    assert teacher_pools(table()) == []  # rows without a teacher_name: no pool
    assert teacher_pools(table().drop_columns(["teacher_name"])) == []


def test_dpkd_metrics_by_teacher_match_each_pool_alone(model):
    """Each pool's split of the mixed batch == the same metric computed on that pool's rows alone, and
    == a direct computation; the unnamed row counts in no pool."""
    t, cfg = pooled(), LossConfig(type="dpkd")  # dpkd's defaults: kd 0.5 + SFT 0.5
    got: dict = {}
    with torch.no_grad():
        loss, _ = compute_loss(model, t, cfg, pad_id=0, by_teacher=got)
        plain, _ = compute_loss(model, t, cfg, pad_id=0)
    assert loss == plain  # the split changes nothing of the loss
    got = ratios(got)
    metrics = ["chosen_reward", "rejected_reward", "reward_margin", "reward_accuracy", "chosen_logratio",
               "rejected_logratio", "sft_loss"]
    assert set(got) == {f"{m}/{p}" for m in metrics for p in "ab"}
    with torch.no_grad():
        rewards = [(float(c), float(r)) for c, r in ref_rewards(model, t)]
    for p in "ab":
        idx = [i for i, n in enumerate(NAMES) if n == p]
        with torch.no_grad():
            _, alone = compute_loss(model, t.take(idx), cfg, pad_id=0)
        for m in metrics:
            assert got[f"{m}/{p}"] == pytest.approx(alone[m], rel=1e-5, abs=1e-6), m
        margins = [rewards[i][0] - rewards[i][1] for i in idx]
        assert got[f"reward_margin/{p}"] == pytest.approx(sum(margins) / len(idx), rel=1e-4, abs=1e-6)
        assert got[f"chosen_reward/{p}"] == pytest.approx(sum(rewards[i][0] for i in idx) / len(idx), rel=1e-4, abs=1e-6)
        assert got[f"reward_accuracy/{p}"] == pytest.approx(sum(m > 0 for m in margins) / len(idx))
        with torch.no_grad():
            assert got[f"sft_loss/{p}"] == pytest.approx(ref_ce(model, t.take(idx)).item(), rel=1e-5)


@pytest.mark.parametrize("kind, extra", [("sft", {}), ("rkl", {"sft_coef": 0.5}), ("fkl", {"student_ratio": 0.0}),
                                         ("dpkd", {"sft_coef": 0.0})])
def test_sft_by_teacher_only_with_an_sft_term(model, kind, extra):
    """Without dpkd's per-row log-probs the CE of y_t per pool is still there when there is an SFT term,
    and absent when there is none."""
    t = pooled()
    got: dict = {}
    with torch.no_grad():
        compute_loss(model, t, LossConfig(type=kind, **extra), pad_id=0, by_teacher=got)
    if kind == "fkl":
        assert got == {}
        return
    if kind == "dpkd":  # no SFT term: no sft_loss, as for the whole batch
        assert not any(k.startswith("sft_loss") for k in got) and "reward_margin/a" in got
        return
    assert set(got) == {"sft_loss/a", "sft_loss/b"}
    for p in "ab":
        idx = [i for i, n in enumerate(NAMES) if n == p]
        with torch.no_grad():
            assert ratios(got)[f"sft_loss/{p}"] == pytest.approx(ref_ce(model, t.take(idx)).item(), rel=1e-5)
        assert got[f"sft_loss/{p}"][1] == sum(len(t.column("chosen_ids")[i].as_py()) for i in idx)  # tokens


def test_by_teacher_sums_add_up_over_ranks_and_micro_batches(model):
    """What the learner does: each rank's micro-batches add their (sum, count) into one dict, ranks add
    theirs, one division at the end == the whole batch in one go (not a mean of means: parts hold
    different numbers of each pool's rows)."""
    from actors.learner import split_rows
    from kd import health

    t, cfg = pooled(), LossConfig(type="dpkd")
    whole: dict = {}
    with torch.no_grad():
        compute_loss(model, t, cfg, pad_id=0, by_teacher=whole)
    total: dict = {}
    for rank in range(2):
        for rows in split_rows(t.num_rows, rank, 2, 2):
            part: dict = {}
            with torch.no_grad():
                compute_loss(model, t.take(rows), cfg, pad_id=0, counts=token_counts(t, cfg), world_size=2,
                             by_teacher=part)
            health.add(total, part)
    assert set(total) == set(whole)
    for k, v in ratios(whole).items():
        assert ratios(total)[k] == pytest.approx(v, rel=1e-5, abs=1e-6), k
