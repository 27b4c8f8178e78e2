"""driver.evaluate.TeacherReference: the teacher's log-probs computed once and reused must give the
same KL, in both directions, as the textbook sum written here from both models' logits."""

import math

import pytest

torch = pytest.importorskip("torch")


def _kl_by_hand(p_logits, q_logits):
    """sum_v p(v) (log p(v) - log q(v)), one position at a time, in float64."""
    total = 0.0
    for pl, ql in zip(p_logits.double(), q_logits.double()):
        p = torch.exp(pl - torch.logsumexp(pl, 0))
        q = torch.exp(ql - torch.logsumexp(ql, 0))
        total += float((p * (torch.log(p) - torch.log(q))).sum())
    return total


def test_cached_teacher_gives_the_textbook_kl_for_each_student(tmp_path):
    from transformers import AutoModelForCausalLM

    from driver.evaluate import TeacherReference, teacher_student_kl
    from kd.models import make_tiny_model

    teacher = str(make_tiny_model(tmp_path / "t", 2, seed=0))
    students = [str(make_tiny_model(tmp_path / f"s{i}", 1, seed=i + 1)) for i in range(2)]
    prompts, conts = [[3, 4, 5], [6, 7]], [[8, 9, 10, 11], [12, 13, 14]]
    ref = TeacherReference(teacher, prompts, conts)

    def logits(path, p, c):
        m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        with torch.no_grad():
            return m(input_ids=torch.tensor([p + c])).logits[0, len(p) - 1:-1]

    for student in students:
        fwd = rev = 0.0
        for p, c in zip(prompts, conts):
            t, s = logits(teacher, p, c), logits(student, p, c)
            fwd, rev = fwd + _kl_by_hand(t, s), rev + _kl_by_hand(s, t)
        got = ref.kl(student)
        assert got["kl_tokens"] == 7
        assert math.isclose(got["kl_teacher_student"], fwd / 7, rel_tol=1e-4)
        assert math.isclose(got["kl_student_teacher"], rev / 7, rel_tol=1e-4)
        assert got == teacher_student_kl(teacher, student, prompts, conts)  # the one-shot form agrees
    assert ref.kl(teacher)["kl_teacher_student"] == pytest.approx(0.0, abs=1e-6)  # itself: no divergence
