"""Response priming: an instruction added to the *teacher's* prompt only, never the student's.

Goyal et al. 2024 (arXiv 2412.17846) prime the teacher so that its responses are easier for a
small student to learn from. Their three strategies are ``teacher``, ``ground_truth`` and
``confidence``; ``cot`` asks for explicit step-by-step reasoning; ``answer_hint`` (not in the paper)
shows the teacher the reference answer and asks it to explain how to reach it.

A priming instruction is appended to the user message, so the chat template stays the model's own.
"""

from __future__ import annotations

from kd.errors import UserInputError

STRATEGIES = ("none", "teacher", "ground_truth", "confidence", "cot", "answer_hint")

TEMPLATES = {
    "none": "",
    "teacher": (
        "As a teacher, guide your student through this problem: explain each step clearly and "
        "simply so that a student can follow and learn from it."
    ),
    "ground_truth": (
        "Give a detailed answer, clear and correct enough that a smaller model can learn to solve "
        "this kind of problem from it."
    ),
    "confidence": "Solve the problem, then briefly double-check that your answer is correct.",
    "cot": "Think step by step, writing out every intermediate calculation, then state the answer.",
    "answer_hint": (
        "The correct final answer is {answer}. Explain step by step how to reach it, without "
        "saying that you were given the answer."
    ),
}


class PrimingError(UserInputError):
    pass


def prime(question: str, strategy: str, answer: str | None = None, template: str | None = None) -> str:
    """The teacher-side user message for ``question`` under ``strategy``.

    ``template`` overrides the strategy's built-in instruction; ``{answer}`` in it is filled with the
    reference answer (required for ``answer_hint``).
    """
    if strategy not in STRATEGIES:
        raise PrimingError(f"priming.strategy={strategy!r}: must be one of {', '.join(STRATEGIES)}")
    instruction = template if template is not None else TEMPLATES[strategy]
    if strategy == "none" and template is None:
        return question
    if "{answer}" in instruction:
        if answer is None or str(answer).strip() == "":
            raise PrimingError(f"priming strategy {strategy!r} needs a reference answer, got none")
        instruction = instruction.replace("{answer}", str(answer).strip())
    return f"{question}\n\n{instruction}"
