"""Reading vLLM's per-position log-probs (``actors.engines.vllm_engine._read_logprobs``) from both of
vLLM's forms, built here with vLLM's own containers: the flat one raykd asks for and the dict per
position an engine without ``flat_logprobs`` returns. Expected values are written out by hand."""

import pytest

pytest.importorskip("vllm")
from vllm.logprobs import FlatLogprobs, Logprob  # noqa: E402

from actors.engines.vllm_engine import _read_logprobs  # noqa: E402

# three positions; at each the given token (ranks 3, 1, 2) and the top-3, descending
GIVEN = [5, 7, 9]
TOP = [[(1, -0.1), (2, -0.2), (5, -0.3)], [(7, -0.05), (4, -0.5), (6, -0.9)], [(8, -0.4), (9, -0.6), (3, -0.7)]]
GIVEN_LP = [-0.3, -0.05, -0.6]


def flat(prefix: int) -> FlatLogprobs:
    out = FlatLogprobs()
    for _ in range(prefix):  # positions before the scored ones (a prompt's): skipped by `first`
        out.append_fast([0], [-9.0], iter([1]), [None])
    for t, lp, top in zip(GIVEN, GIVEN_LP, TOP):
        out.append_fast([t] + [i for i, _ in top], [lp] + [v for _, v in top], iter([0, 1, 2, 3]), [None] * 4)
    return out


def dicts(prefix: int) -> list:
    out = [None] * prefix
    for t, lp, top in zip(GIVEN, GIVEN_LP, TOP):
        d = {i: Logprob(v, rank=r + 1) for r, (i, v) in enumerate(top)}
        d[t] = Logprob(lp, rank=1)  # the given token is in the dict once, also when in the top-k
        out.append(d)
    return out


@pytest.mark.parametrize("form", [flat, dicts])
def test_both_forms_read_the_same(form):
    lps, ids, vals = _read_logprobs(form(2), 2, GIVEN, 2)
    assert lps == [-0.3, -0.05, -0.6]
    assert ids == [[1, 2], [7, 4], [8, 9]]
    assert vals == [[-0.1, -0.2], [-0.05, -0.5], [-0.4, -0.6]]
    assert _read_logprobs(form(2), 2, GIVEN, 0) == ([-0.3, -0.05, -0.6], [], [])


def test_a_flat_layout_that_does_not_start_with_the_given_token_is_an_error():
    with pytest.raises(RuntimeError, match="position 1 starts with token 5, not the given token 6"):
        _read_logprobs(flat(1), 1, [6, 7, 9], 2)
