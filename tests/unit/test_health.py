"""kd.health: every distillation health metric against a value worked out by hand on a small constructed
batch (the formula is written next to it), how the sums add up over parts of a batch, what the
learner's forward feeds them (``compute_loss(health=...)``), and where they show (Ray gauges, progress
bar, report plots)."""

import math

import pyarrow as pa
import pytest
import torch

from driver.config import LossConfig
from kd.data import BUFFER_SCHEMA
from kd.health import add, means, row_health, token_health
from kd.models import make_tiny_model
from kd.objective import compute_loss

LN = math.log


def entropy(logits: list[float]) -> float:
    """-sum_v q(v) log q(v) of softmax(logits), written out."""
    z = sum(math.exp(x) for x in logits)
    q = [math.exp(x) / z for x in logits]
    return -sum(p * math.log(p) for p in q)


# position 0: student top-2 {0, 1}, argmax 0; teacher top-2 ids [0, 2] (top-1 0): agree, overlap 1/2
# position 1: student top-2 {2, 3}, argmax 2; teacher ids [3, 2], log-probs NOT sorted by id order,
#             the larger is id 3: top-1 disagrees, overlap 2/2
# position 2: masked out (NaN logits: must never be read)
LOGITS = [[3.0, 2.0, 1.0, 0.0], [0.0, 1.0, 5.0, 2.0], [float("nan")] * 4]
T_IDS = [[0, 2], [3, 2], [0, 1]]
T_LPS = [[LN(0.5), LN(0.3)], [LN(0.6), LN(0.2)], [0.0, 0.0]]
MASK = [1.0, 1.0, 0.0]


def test_token_health_by_hand():
    got = means(token_health(torch.tensor([LOGITS]), torch.tensor([MASK]), torch.tensor([T_IDS]),
                             torch.tensor([T_LPS])))
    assert got["top1_agreement"] == pytest.approx((1 + 0) / 2)
    assert got["topk_overlap"] == pytest.approx((1 / 2 + 2 / 2) / 2)
    assert got["student_entropy"] == pytest.approx((entropy(LOGITS[0]) + entropy(LOGITS[1])) / 2, rel=1e-6)


def test_token_health_without_or_with_partial_topk():
    logits, mask = torch.tensor([LOGITS]), torch.tensor([MASK])
    got = token_health(logits, mask)
    assert set(got) == {"student_entropy"}  # no teacher top-k: no agreement metrics, not zeros
    # top-k stored only at position 1: the agreement metrics count that position alone
    got = means(token_health(logits, mask, torch.tensor([T_IDS]), torch.tensor([T_LPS]),
                             topk_mask=torch.tensor([[0.0, 1.0, 1.0]])))
    assert got["top1_agreement"] == 0.0 and got["topk_overlap"] == 1.0
    assert token_health(logits, torch.zeros(1, 3)) == {}


def test_sums_of_parts_give_the_whole_batch_mean():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 5, 11, generator=g)
    mask = (torch.rand(4, 5, generator=g) > 0.3).float()
    ids = torch.stack([torch.randperm(11, generator=g)[:3] for _ in range(20)]).reshape(4, 5, 3)
    lps = torch.randn(4, 5, 3, generator=g).log_softmax(-1)
    whole = means(token_health(logits, mask, ids, lps))
    parts = add(token_health(logits[:1], mask[:1], ids[:1], lps[:1]),
                token_health(logits[1:], mask[1:], ids[1:], lps[1:]))
    assert means(parts) == pytest.approx(whole)
    # and the whole-batch top-1 agreement is the plain share over unmasked positions
    t_top1 = ids.gather(-1, lps.argmax(-1, keepdim=True)).squeeze(-1)
    agree = ((logits.argmax(-1) == t_top1).float() * mask).sum() / mask.sum()
    assert whole["top1_agreement"] == pytest.approx(float(agree))


def rows(**cols) -> pa.Table:
    n = len(cols["chosen_ids"])
    base = {"prompt_id": [str(i) for i in range(n)], "prompt_ids": [[3, 4]] * n, "teacher_prompt_ids": [[3]] * n,
            "rejected_ids": [[]] * n, "chosen_teacher_logps": [[]] * n, "rejected_teacher_logps": [[]] * n,
            "chosen_topk_ids": [None] * n, "chosen_topk_logps": [None] * n, "rejected_topk_ids": [None] * n,
            "rejected_topk_logps": [None] * n, "rejected_behaviour_logps": [None] * n, "policy_version": [0] * n,
            "priming": ["none"] * n, "created_at": [0.0] * n, "reference_answer": [None] * n, "teacher_name": [None] * n,
        "chosen_teacher_logp_sum": [None] * n, "rejected_teacher_logp_sum": [None] * n}
    base.update(cols)
    return pa.Table.from_pydict(base, schema=BUFFER_SCHEMA)


EOS = 2
TEXT = {(5, 6, 7, 8): "so it is 12", (5, 2): "7", (5, 6, 7, 2): "the answer is 7", (9, 9, 9): "7 apples",
        (5,): "hm"}


def test_row_health_by_hand():
    t = rows(
        # row 0: y_t 4 tokens = budget, no EOS -> truncated; y_s 2 tokens ending in EOS
        # row 1: y_t 4 tokens = budget but ends in EOS -> not truncated; y_s 3 tokens = budget -> truncated
        # row 2: an offline row (no y_s), no reference answer
        chosen_ids=[[5, 6, 7, 8], [5, 6, 7, 2], [5]],
        rejected_ids=[[5, 2], [9, 9, 9], []],
        reference_answer=["12", "#### 7", None],
        chosen_topk_logps=[[[LN(0.5), LN(0.25)], [LN(0.9), LN(0.05)], [], [LN(0.4)]], None, [[LN(0.7)]]],
        rejected_topk_logps=[None, [[LN(0.2), LN(0.1)]] * 3, None],
    )
    got = means(row_health(t, {"chosen": 4, "rejected": 3}, EOS, lambda ids: TEXT[tuple(ids)]))
    assert got["y_t_len"] == pytest.approx((4 + 4 + 1) / 3)
    assert got["y_s_len"] == pytest.approx((2 + 3) / 2)  # rows without a student sample do not count
    assert got["y_t_truncated"] == pytest.approx(1 / 3)
    assert got["y_s_truncated"] == pytest.approx(1 / 2)
    # references 12 and 7 (row 2 has none): y_t says 12 and 7 -> 2/2; y_s says 7 and 7 -> 1/2
    assert got["y_t_exact_match"] == pytest.approx(1.0)
    assert got["y_s_exact_match"] == pytest.approx(0.5)
    # teacher top-k mass per stored position: 0.75, 0.95, 0.4 (the empty one is not a position), 0.7,
    # and 0.3 at y_s's three positions
    assert got["teacher_topk_mass"] == pytest.approx((0.75 + 0.95 + 0.4 + 0.7 + 0.3 * 3) / 7)


def test_row_health_leaves_out_what_it_cannot_know():
    t = rows(chosen_ids=[[5, 6, 7, 8]], reference_answer=["no number here"])
    got = row_health(t)  # no budgets, no decoder, no top-k, no y_s
    assert set(got) == {"y_t_len"}
    assert "y_t_exact_match" not in row_health(t, decode=lambda ids: "12")  # reference without a number


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    path = make_tiny_model(tmp_path_factory.mktemp("m") / "tiny", num_layers=2, seed=0)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def test_compute_loss_feeds_the_trained_sequences(model):
    """The forward's metrics equal those of plain per-row forwards on the sequences the loss trains on
    (sft: y_t only), and asking for them leaves the loss as it was."""
    g = torch.Generator().manual_seed(1)
    prompts, chosen = [[3, 9, 14], [7, 8]], [[20, 21, 22], [30, 31]]
    topk = [[torch.randperm(40, generator=g)[:4].tolist() for _ in c] for c in chosen]
    topl = [[torch.randn(5, generator=g).log_softmax(-1)[:4].tolist() for _ in c] for c in chosen]
    t = rows(chosen_ids=chosen, prompt_ids=prompts, chosen_topk_ids=topk, chosen_topk_logps=topl,
             rejected_ids=[[40, 41], [42]])
    cfg = LossConfig(type="sft")
    sums: dict = {}
    with torch.no_grad():
        loss, _ = compute_loss(model, t, cfg, pad_id=0, health=sums)
        plain, _ = compute_loss(model, t, cfg, pad_id=0)
    assert float(loss) == float(plain)
    agree = overlap = ent = n = 0.0
    with torch.no_grad():
        for p, c, ids, lps in zip(prompts, chosen, topk, topl):
            logits = model(torch.tensor([p + c])).logits[0, len(p) - 1:len(p) - 1 + len(c)]
            for x, tid, tlp in zip(logits, ids, lps):
                ent += entropy(x.tolist())
                agree += float(int(x.argmax()) == tid[max(range(4), key=lambda j: tlp[j])])
                overlap += len(set(x.topk(4).indices.tolist()) & set(tid)) / 4
                n += 1
    got = means(sums)
    assert sums["student_entropy"][1] == n == 5  # y_t's 5 tokens; y_s is not trained on under sft
    assert got["student_entropy"] == pytest.approx(ent / n, rel=1e-4)
    assert got["top1_agreement"] == pytest.approx(agree / n)
    assert got["topk_overlap"] == pytest.approx(overlap / n)


def test_health_shows_in_ray_gauges_progress_bar_and_report(tmp_path):
    import json

    from actors import metrics
    from driver.monitoring import progress_postfix
    from driver.report import PLOTS, make_report

    keys = set(means(row_health(rows(chosen_ids=[[5]], rejected_ids=[[9, 9, 9]], reference_answer=["7"],
                                     chosen_topk_logps=[[[LN(0.5)]]]), {"chosen": 1, "rejected": 3}, EOS,
                                lambda ids: "7")))
    keys |= set(token_health(torch.tensor([LOGITS]), torch.tensor([MASK]), torch.tensor([T_IDS]),
                             torch.tensor([T_LPS])))
    assert set(metrics.HEALTH_GAUGES) == keys  # every health metric has a Ray gauge, and no more
    assert all(name in metrics.NAMES for name in metrics.HEALTH_GAUGES.values())
    assert keys <= {k for spec in PLOTS for k in spec.keys}  # and a report plot
    assert progress_postfix({"top1_agreement": 0.4567})["top1"] == "0.46"
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0, "top1_agreement": 0.1 * s,
                                                           "y_s_len": 10.0 * s}) + "\n" for s in (1, 2)))
    rep = make_report([run])
    assert rep.lines["agreement"] == {"top1_agreement": ([1.0, 2.0], [0.1, 0.2])}
    assert rep.lines["lengths"] == {"y_s_len": ([1.0, 2.0], [10.0, 20.0])}
    assert "| top1_agreement | run | 0.1 | 0.2 | 0.2 |" in rep.markdown.read_text()
