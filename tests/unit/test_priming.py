import pytest

from kd.priming import STRATEGIES, PrimingError, prime


def test_none_leaves_the_question_alone():
    assert prime("What is 2+2?", "none") == "What is 2+2?"


@pytest.mark.parametrize("strategy", [s for s in STRATEGIES if s not in ("none", "answer_hint")])
def test_each_strategy_adds_its_instruction(strategy):
    out = prime("What is 2+2?", strategy)
    assert out.startswith("What is 2+2?") and len(out) > len("What is 2+2?") + 10


def test_paper_strategies_say_what_the_paper_says():
    assert "As a teacher" in prime("q", "teacher")
    assert "double-check" in prime("q", "confidence")
    assert "smaller model" in prime("q", "ground_truth")


def test_answer_hint_shows_the_answer_and_needs_one():
    assert "The correct final answer is 4." in prime("What is 2+2?", "answer_hint", answer="4")
    with pytest.raises(PrimingError, match="needs a reference answer"):
        prime("What is 2+2?", "answer_hint", answer=None)


def test_custom_template_and_unknown_strategy():
    assert prime("q", "teacher", template="Be brief.") == "q\n\nBe brief."
    assert prime("q", "none", template="Hint: {answer}", answer="9") == "q\n\nHint: 9"
    with pytest.raises(PrimingError, match="must be one of"):
        prime("q", "shout")
