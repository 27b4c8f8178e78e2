"""Response priming: an instruction added to the *teacher's* prompt only, never the student's.

Goyal et al. 2024 (arXiv 2412.17846) prime the teacher so that its responses are easier for a small
student to learn from. Their three strategies are ``teacher``, ``ground_truth`` and ``confidence``. In
their reference code (alonso130r/knowledge-distillation, notebooks
``llama-3.1-405b-6bpw/inference_gsm8k-prompt{1,2,3}.ipynb``) the instruction is *prepended* to the
question (instruction, a space, the question) and the teacher does not generate: one forward pass over
the primed question gives logits the student is trained against. raykd lets the primed teacher
*generate* y_t and distils from that text (and its log-probs): a different pipeline with the same
priming. See docs/priming.md.

``wording``: ``reference`` (default) uses the reference code's instructions for the paper's three
strategies; ``raykd`` uses raykd's earlier paraphrases. ``placement``: ``prepend`` (default, as the
reference) or ``append`` (after the question, separated by a blank line). ``cot`` asks for explicit
step-by-step reasoning and ``answer_hint`` (not in the paper) shows the teacher the reference answer;
neither has a reference wording, so both wordings use raykd's text for them.
"""

from __future__ import annotations

from kd.errors import UserInputError

STRATEGIES = ("none", "teacher", "ground_truth", "confidence", "cot", "answer_hint")
WORDINGS = ("reference", "raykd")
PLACEMENTS = ("prepend", "append")

# The reference code's instructions (prompt1, prompt2, prompt3 of the notebooks named above).
REFERENCE = {
    "teacher": ("As a teacher, guide your student through solving the question below. Provide a clear, "
                "simple explanation for someone unfamiliar with the problem."),
    "ground_truth": ("As a smart language model, provide a detailed answer that is clear and feasible for "
                     "smaller models to understand and learn from without losing too much detail."),
    "confidence": "(At the end of the question) Briefly double-check that your answer is correct once done.",
}

RAYKD = {
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


def instruction_for(strategy: str, wording: str = "reference") -> str:
    """The built-in instruction of ``strategy`` in ``wording`` ('' for ``none``)."""
    if strategy not in STRATEGIES:
        raise PrimingError(f"priming.strategy={strategy!r}: must be one of {', '.join(STRATEGIES)}")
    if wording not in WORDINGS:
        raise PrimingError(f"priming.wording={wording!r}: must be one of {', '.join(WORDINGS)}")
    if strategy == "none":
        return ""
    table = REFERENCE if wording == "reference" else RAYKD
    return table.get(strategy, RAYKD[strategy])


def prime(question: str, strategy: str, answer: str | None = None, template: str | None = None,
          placement: str = "prepend", wording: str = "reference") -> str:
    """The teacher-side user message for ``question`` under ``strategy``.

    ``template`` overrides the strategy's built-in instruction; ``{answer}`` in it is filled with the
    reference answer (required for ``answer_hint``).
    """
    if placement not in PLACEMENTS:
        raise PrimingError(f"priming.placement={placement!r}: must be one of {', '.join(PLACEMENTS)}")
    instruction = template if template is not None else instruction_for(strategy, wording)
    if not instruction:
        return question
    if "{answer}" in instruction:
        if answer is None or str(answer).strip() == "":
            raise PrimingError(f"priming strategy {strategy!r} needs a reference answer, got none")
        instruction = instruction.replace("{answer}", str(answer).strip())
    return f"{instruction} {question}" if placement == "prepend" else f"{question}\n\n{instruction}"
