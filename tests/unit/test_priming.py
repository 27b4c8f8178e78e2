import pytest

from kd.priming import STRATEGIES, PrimingError, prime

# The reference code's prompts (alonso130r/knowledge-distillation, llama-3.1-405b-6bpw/
# inference_gsm8k-prompt{1,2,3}.ipynb), copied here from the notebooks, not from kd/priming.py: there
# `questions = [prompt + question for question in questions]` with each prompt ending in one space.
NOTEBOOK_PROMPTS = {
    "teacher": "As a teacher, guide your student through solving the question below. Provide a clear, "
               "simple explanation for someone unfamiliar with the problem. ",
    "ground_truth": "As a smart language model, provide a detailed answer that is clear and feasible for "
                    "smaller models to understand and learn from without losing too much detail. ",
    "confidence": "(At the end of the question) Briefly double-check that your answer is correct once done. ",
}


def test_none_leaves_the_question_alone():
    assert prime("What is 2+2?", "none") == "What is 2+2?"


@pytest.mark.parametrize("strategy", sorted(NOTEBOOK_PROMPTS))
def test_default_is_the_reference_prompt_prepended(strategy):
    q = "Natalia sold clips to 48 of her friends. How many clips did she sell?"
    assert prime(q, strategy) == NOTEBOOK_PROMPTS[strategy] + q


@pytest.mark.parametrize("strategy", [s for s in STRATEGIES if s not in ("none", "answer_hint")])
def test_append_placement_puts_the_instruction_after_the_question(strategy):
    out = prime("What is 2+2?", strategy, placement="append", wording="raykd")
    assert out.startswith("What is 2+2?\n\n") and len(out) > len("What is 2+2?") + 10


def test_raykd_wording_keeps_the_earlier_paraphrases():
    assert prime("q", "confidence", wording="raykd", placement="append") == (
        "q\n\nSolve the problem, then briefly double-check that your answer is correct.")
    assert prime("q", "teacher", wording="raykd") != prime("q", "teacher")


def test_answer_hint_shows_the_answer_and_needs_one():
    assert prime("What is 2+2?", "answer_hint", answer="4").startswith("The correct final answer is 4. ")
    with pytest.raises(PrimingError, match="needs a reference answer"):
        prime("What is 2+2?", "answer_hint", answer=None)


def test_custom_template_and_bad_names():
    assert prime("q", "teacher", template="Be brief.") == "Be brief. q"
    assert prime("q", "none", template="Hint: {answer}", answer="9", placement="append") == "q\n\nHint: 9"
    with pytest.raises(PrimingError, match="must be one of"):
        prime("q", "shout")
    with pytest.raises(PrimingError, match="priming.placement='middle'"):
        prime("q", "teacher", placement="middle")
    with pytest.raises(PrimingError, match="priming.wording='poetic'"):
        prime("q", "teacher", wording="poetic")
