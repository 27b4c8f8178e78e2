"""kd.objective: batching layout, DPKD against a direct computation, and data-parallel normalisation."""

import pyarrow as pa
import pytest
import torch

from driver.config import LossConfig
from kd import losses as L
from kd.data import BUFFER_SCHEMA
from kd.models import make_tiny_model
from kd.objective import compute_loss, pack, response_logits, token_logps


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    path = make_tiny_model(tmp_path_factory.mktemp("m") / "tiny", num_layers=2, seed=0)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def table(n=4, seed=0, k=3):
    g = torch.Generator().manual_seed(seed)

    def seq(lo, hi):
        return torch.randint(3, 400, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()

    chosen = [seq(2, 7) for _ in range(n)]
    rejected = [seq(1, 6) for _ in range(n)]
    lps = lambda s: (-torch.rand(len(s), generator=g) * 3).tolist()  # noqa: E731
    topk = lambda s: [sorted(torch.randperm(400, generator=g)[:k].tolist()) for _ in s]  # noqa: E731
    topl = lambda s: [sorted((-torch.rand(k, generator=g) * 4).tolist(), reverse=True) for _ in s]  # noqa: E731
    return pa.Table.from_pydict({
        "prompt_id": [str(i) for i in range(n)],
        "prompt_ids": [seq(2, 9) for _ in range(n)], "teacher_prompt_ids": [[1]] * n,
        "chosen_ids": chosen, "rejected_ids": rejected,
        "chosen_teacher_logps": [lps(s) for s in chosen], "rejected_teacher_logps": [lps(s) for s in rejected],
        "chosen_topk_ids": [topk(s) for s in chosen], "chosen_topk_logps": [topl(s) for s in chosen],
        "rejected_topk_ids": [topk(s) for s in rejected], "rejected_topk_logps": [topl(s) for s in rejected],
        "rejected_behaviour_logps": [lps(s) for s in rejected], "policy_version": [0] * n,
        "priming": ["none"] * n, "created_at": [0.0] * n, "reference_answer": [None] * n,
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


def test_dpkd_matches_a_direct_computation(model):
    t = table()
    cfg = LossConfig(type="dpkd", beta=0.1, lm_coef=0.0)
    loss, metrics = compute_loss(model, t, cfg, pad_id=0)
    pc, pr, rc, rr, lc, lr = [], [], [], [], [], []
    for row in t.to_pylist():
        for seq_key, ref_key, pol, ref, ln in (("chosen_ids", "chosen_teacher_logps", pc, rc, lc),
                                               ("rejected_ids", "rejected_teacher_logps", pr, rr, lr)):
            p, r = row["prompt_ids"], row[seq_key]
            logits = model(input_ids=torch.tensor([p + r])).logits[0].log_softmax(-1)
            pol.append(logits[len(p) - 1 : -1].gather(-1, torch.tensor(r)[:, None]).sum())
            ref.append(sum(row[ref_key]))
            ln.append(len(r))
    z = 0.1 * ((torch.stack(pc) - torch.tensor(rc)) / torch.tensor(lc, dtype=torch.float)
               - (torch.stack(pr) - torch.tensor(rr)) / torch.tensor(lr, dtype=torch.float))
    expected = -torch.nn.functional.logsigmoid(z).mean()
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    assert metrics["reward_margin"] == pytest.approx((z / 1).mean().item(), abs=1e-5)


@pytest.mark.parametrize("kind", ["dpkd", "fkl", "sft", "pg_rkl", "dpkd_token", "jsd"])
def test_two_ranks_take_the_same_step_as_one(model, kind):
    """Global normalisation: (grad rank0 + grad rank1) / 2 (DeepSpeed's average) == grad of the whole."""
    t = table(n=6, seed=1)
    cfg = LossConfig(type=kind, lm_coef=0.5)

    def grads(tab, **kw):
        model.zero_grad()
        loss, _ = compute_loss(model, tab, cfg, pad_id=0, **kw)
        loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    whole = grads(t)
    counts = {"chosen": sum(map(len, t.column("chosen_ids").to_pylist())),
              "rejected": sum(map(len, t.column("rejected_ids").to_pylist()))}
    parts = [grads(t.take(list(range(r, 6, 2))), global_pairs=6, global_tokens=counts, world_size=2)
             for r in range(2)]
    for w, a, b in zip(whole, *parts):
        torch.testing.assert_close((a + b) / 2, w, atol=1e-5, rtol=1e-4)


def test_token_loss_without_topk_is_a_clear_error(model):
    t = table().drop_columns(["rejected_topk_ids"]).append_column(
        pa.field("rejected_topk_ids", pa.list_(pa.list_(pa.int32()))), pa.array([None] * 4,
                                                                                 pa.list_(pa.list_(pa.int32()))))
    with pytest.raises(ValueError, match="top_k_logprobs"):
        compute_loss(model, t, LossConfig(type="fkl", lm_coef=0.0), pad_id=0)


def test_lm_coef_adds_sft_on_the_teacher_output(model):
    t = table()
    base, _ = compute_loss(model, t, LossConfig(type="dpkd", lm_coef=0.0), pad_id=0)
    with_lm, m = compute_loss(model, t, LossConfig(type="dpkd", lm_coef=0.5), pad_id=0)
    torch.testing.assert_close(with_lm, base + 0.5 * torch.tensor(m["lm_loss"]), atol=1e-5, rtol=1e-5)
    assert L.LOSS_TYPES  # the registry the config validates against
