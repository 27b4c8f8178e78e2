"""Only the teacher work a loss needs: which engine calls each loss makes, and that the rows it gets
(absent sides empty, same schema) still train."""

import math

import pytest
import torch

from actors.engines.base import Engine, Generation, SamplingParams, Scores
from actors.teacher_pool import TeacherWorker
from driver.config import LossConfig
from kd.models import make_tiny_model
from kd.objective import compute_loss, loss_needs


class CountingEngine(Engine):
    """Records every call; answers with fixed tokens of a 512-token vocabulary."""

    def __init__(self):
        self.calls: list[str] = []

    def generate(self, prompts, params):
        self.calls.append("generate")
        k = params.top_k_logprobs
        return [Generation([11, 12, 13], [-1.0, -1.5, -0.5], "length", 0, [[11, 40][:k]] * 3,
                           [[-1.0, -2.0][:k]] * 3) for _ in prompts]

    def score(self, prompts, continuations, top_k=0):
        self.calls.append("score")
        return [Scores([-2.0] * len(c), [[c[0], 41][:top_k]] * len(c), [[-1.0, -2.5][:top_k]] * len(c))
                for c in continuations]

    def update_weights(self, weights, version):
        pass


def worker(score_with="primed") -> TeacherWorker:
    w = TeacherWorker.__new__(TeacherWorker)  # the actor class, without building a real engine
    w.index, w.engine, w.top_k, w.score_with = 0, CountingEngine(), 2, score_with
    w.params = SamplingParams(max_new_tokens=3, top_k_logprobs=2)
    w.pairs, w.busy_s, w.generated_tokens, w.scored_tokens, w.reused_answers = 0, 0.0, 0, 0, 0
    return w


REQUESTS = [{"prompt_id": f"p{i}", "prompt_ids": [5, 6, 7], "teacher_prompt_ids": [5, 6, 7], "priming": "none",
             "reference_answer": None} for i in range(3)]
STUDENT = [Generation([20, 21], [-0.7, -0.9], "length", 4) for _ in range(3)]

CASES = [  # (loss, engine calls, whether the sampler is asked for y_s)
    (LossConfig(type="dpkd"), ["generate", "score"], True),
    (LossConfig(type="jsd"), ["score"], True),  # GKD on the student's samples: no y_t
    (LossConfig(type="jsd", sft_coef=0.5), ["generate", "score"], True),
    (LossConfig(type="rkl"), ["score"], True),
    (LossConfig(type="fkl"), ["generate"], False),  # student_ratio 0: the teacher's text only
    (LossConfig(type="fkl", student_ratio=0.5), ["generate", "score"], True),
    (LossConfig(type="pg_rkl"), ["score"], True),
    (LossConfig(type="dpkd_token"), ["generate"], False),
    (LossConfig(type="sft"), ["generate"], False),
]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    path = make_tiny_model(tmp_path_factory.mktemp("m") / "tiny", num_layers=2, seed=0)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


@pytest.mark.parametrize("loss,calls,samples", CASES, ids=[f"{c[0].type}-{i}" for i, c in enumerate(CASES)])
def test_each_loss_makes_only_the_engine_calls_it_reads(loss, calls, samples, model):
    needs = loss_needs(loss)
    assert needs["y_s"] is samples
    w = worker()
    table = w.make_pairs(REQUESTS, STUDENT if needs["y_s"] else None, needs)
    assert w.engine.calls == calls
    assert table.num_rows == 3
    if "generate" not in calls:
        assert table.column("chosen_ids").to_pylist() == [[]] * 3
    if "score" not in calls:
        assert table.column("rejected_teacher_logps").to_pylist() == [[]] * 3
    value, _ = compute_loss(model, table, loss, pad_id=0)  # the rows carry all this loss reads
    assert math.isfinite(value.item())


def test_plain_scoring_scores_only_what_is_needed():
    w = worker(score_with="plain")
    w.make_pairs(REQUESTS, STUDENT, loss_needs(LossConfig(type="jsd")))
    assert w.engine.calls == ["score"]
    assert w.scored_tokens == 3 * 2 and w.generated_tokens == 0


def test_default_needs_do_everything():
    w = worker()
    w.make_pairs(REQUESTS, STUDENT)
    assert w.engine.calls == ["generate", "score"]
    assert w.generated_tokens == 9 and w.scored_tokens == 6


STORED = {"chosen_ids": [30, 31], "chosen_teacher_logps": [-0.25, -0.75],
          "chosen_topk_ids": [[30, 40], [31, 40]], "chosen_topk_logps": [[-0.25, -3.0], [-0.75, -2.0]]}


@pytest.mark.parametrize("score_with", ["primed", "plain"])
def test_a_stored_answer_is_used_as_y_t_and_only_the_others_are_generated(score_with):
    """schedule[i].teacher_answers: a request that carries the teacher's stored answer gets it as y_t
    with its stored scores; the engine generates (and, scoring plain, scores) only the others' y_t."""
    w = worker(score_with)
    requests = [dict(REQUESTS[0], teacher_answer=STORED), REQUESTS[1], dict(REQUESTS[2], teacher_answer=STORED)]
    table = w.make_pairs(requests, STUDENT, loss_needs(LossConfig(type="dpkd")))
    rows = table.to_pylist()
    for j in (0, 2):  # the stored answer, exactly as stored
        assert rows[j]["chosen_ids"] == [30, 31] and rows[j]["chosen_teacher_logps"] == [-0.25, -0.75]
        assert rows[j]["chosen_topk_ids"] == [[30, 40], [31, 40]]
        assert rows[j]["chosen_topk_logps"] == [[-0.25, -3.0], [-0.75, -2.0]]
    assert rows[1]["chosen_ids"] == [11, 12, 13]  # CountingEngine's answer
    expected = [-1.0, -1.5, -0.5] if score_with == "primed" else [-2.0] * 3  # sampled, or scored plain
    assert rows[1]["chosen_teacher_logps"] == expected
    assert all(r["rejected_teacher_logps"] == [-2.0, -2.0] for r in rows)  # y_s scored for every row
    assert w.engine.calls == ["generate", "score"]
    assert w.generated_tokens == 3 and w.reused_answers == 2
    assert w.scored_tokens == 3 * 2 + (0 if score_with == "primed" else 3)


def test_no_generation_when_every_answer_is_stored():
    w = worker()
    requests = [dict(r, teacher_answer=STORED) for r in REQUESTS]
    w.make_pairs(requests, STUDENT, loss_needs(LossConfig(type="dpkd")))
    assert w.engine.calls == ["score"] and w.generated_tokens == 0 and w.reused_answers == 3
