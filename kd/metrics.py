"""Evaluation metrics: GSM8K-style exact match, Rouge-L, teacher-student token KL, mean/std.

Pure Python (torch only inside ``token_kl``), unit-testable in milliseconds.

**Answer extraction** (``extract_answer``), the rule ``raykd eval`` scores exact match with:

1. Find the answer span. The first of these markers present in the text wins, taking the text after
   its *last* occurrence: ``####`` (GSM8K), ``\\boxed{...}`` (its braces' content, nested braces
   allowed), ``the answer is`` / ``answer:`` (case-insensitive). The answer is the *first* number in
   that span.
2. If no marker is present, or the span holds no number, the answer is the *last* number in the whole
   text (what a chain-of-thought ends with).
3. A number is an optional minus sign, digits with optional ``,`` thousands groups (``1,234``) and an
   optional decimal part: ``-3``, ``1,234.50``, ``.5``. Currency signs, ``%`` and units around it are
   ignored (``$5.`` -> ``5``, ``18 apples`` -> ``18``); a full stop ending a sentence is not a decimal
   point. A ``-`` glued to a preceding digit (``5-3``) is subtraction, not a sign. Fractions and
   expressions are not evaluated (``\\frac{1}{2}`` gives ``1``).
4. The number is normalised: commas removed, trailing zeros of the decimal part dropped, ``-0`` -> ``0``
   (``18.00`` -> ``18``, ``3.50`` -> ``3.5``). No number at all -> ``None``.

``exact_match(prediction, reference)`` extracts from both sides with the same rule (a reference may be
a GSM8K solution ending in ``#### N`` or just ``N``) and compares the normalised numbers exactly;
it is ``None`` (not applicable) when the reference has no number, and ``False`` when only the
prediction has none.

**Rouge-L** (``rouge_l``): the F1 of the longest common subsequence of lower-cased whitespace tokens,
``P = LCS/len(pred)``, ``R = LCS/len(ref)``, ``F = 2PR/(P+R)``; 0.0 when either side is empty.
"""

from __future__ import annotations

import math
import re
from decimal import Decimal, InvalidOperation

_NUMBER = re.compile(r"(?<!\d)-?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)?(?:\.\d+)?")
_ANSWER_IS = re.compile(r"the (?:final )?answer is|answer\s*:", re.IGNORECASE)


def _numbers(text: str) -> list[str]:
    """Number literals in ``text``, in order (see rule 3)."""
    out = []
    for m in _NUMBER.finditer(text):
        s = m.group(0)
        if any(c.isdigit() for c in s):
            out.append(s)
    return out


def normalize_number(s: str) -> str | None:
    """``'1,234.50'`` -> ``'1234.5'``, ``'-0'`` -> ``'0'``; None if ``s`` is not a number."""
    try:
        d = Decimal(s.replace(",", "").strip())
    except InvalidOperation:
        return None
    if not d.is_finite():
        return None
    if d == 0:
        return "0"
    d = d.normalize()
    text = format(d, "f")  # never scientific notation
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text


def _boxed_content(text: str) -> str | None:
    """The content of the last ``\\boxed{...}``, with nested braces; None if there is none."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i, depth = start + len("\\boxed{"), 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j]
    return text[i:]  # unclosed (generation cut off): take what is there


def _marked_span(text: str) -> str | None:
    if "####" in text:
        return text.rsplit("####", 1)[1]
    boxed = _boxed_content(text)
    if boxed is not None:
        return boxed
    found = list(_ANSWER_IS.finditer(text))
    if found:
        return text[found[-1].end():]
    return None


def extract_answer(text: str | None) -> str | None:
    """The normalised numeric answer of ``text`` by the rule in the module docstring, or None."""
    if text is None:
        return None
    text = str(text).replace("\u2212", "-")  # typographic minus
    span = _marked_span(text)
    if span is not None:
        nums = _numbers(span)
        if nums:
            return normalize_number(nums[0])
    nums = _numbers(text)
    return normalize_number(nums[-1]) if nums else None


def exact_match(prediction: str | None, reference: str | None) -> bool | None:
    """Whether the two numeric answers agree; None when the reference has no number."""
    ref = extract_answer(reference)
    if ref is None:
        return None
    return extract_answer(prediction) == ref


def _lcs_length(a: list[str], b: list[str]) -> int:
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)  # one row of the DP table: O(len(b)) memory
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(prediction: str | None, reference: str | None) -> float:
    """Rouge-L F1 over lower-cased whitespace tokens (see the module docstring)."""
    pred = (prediction or "").lower().split()
    ref = (reference or "").lower().split()
    if not pred or not ref:
        return 0.0
    lcs = _lcs_length(pred, ref)
    if lcs == 0:
        return 0.0
    p, r = lcs / len(pred), lcs / len(ref)
    return 2 * p * r / (p + r)


def mean_std(values) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (ddof=1; 0.0 for one value) of the non-None values;
    ``(None, None)`` when there are none."""
    xs = [float(v) for v in values if v is not None]
    if not xs:
        return None, None
    m = sum(xs) / len(xs)
    if len(xs) == 1:
        return m, 0.0
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def token_kl(teacher_logits, student_logits):
    """Per-position ``KL(p_teacher || q_student)`` in nats from full logits ``[..., V]`` -> ``[...]``
    (fp32; the teacher is the reference distribution, as in forward-KL distillation)."""
    import torch

    logp = torch.log_softmax(teacher_logits.float(), -1)
    logq = torch.log_softmax(student_logits.float(), -1)
    return kl_from_logps(logp, logq)


def kl_from_logps(logp, logq):
    """Per-position KL(p || q) in nats from normalised log-probs ``[..., V]``."""
    return (logp.exp() * (logp - logq)).sum(-1)


def kl_both_ways(logp, logq):
    """Per-position ``(KL(p || q), KL(q || p))``: both directions from one normalisation of each side."""
    return kl_from_logps(logp, logq), kl_from_logps(logq, logp)
