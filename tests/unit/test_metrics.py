"""Evaluation metrics (answer extraction, Rouge-L, KL, mean/std), scoring with a fake generator,
periodic evaluation, and the Ray metrics helpers' no-op path outside Ray."""

import math

import pytest

from kd.metrics import exact_match, extract_answer, mean_std, normalize_number, rouge_l, token_kl


@pytest.mark.parametrize("text, expected", [
    ("#### 1,234", "1234"),
    ("She has 3 + 4 = 7 apples.\n#### 7", "7"),
    ("#### $1,000,000.00", "1000000"),
    ("so 5 then #### 12 and 99 later", "12"),  # first number after the marker
    ("first #### 3 then #### 4", "4"),  # the last marker
    ("\\boxed{42}", "42"),
    ("Thus the result is $\\boxed{-3.5}$ units, not 10.", "-3.5"),
    ("\\boxed{\\text{18 apples}}", "18"),  # nested braces
    ("\\boxed{1,024", "1024"),  # cut off before the closing brace
    ("The answer is $5.", "5"),
    ("the answer is: 7 cookies. We checked 3 times.", "7"),
    ("So the final answer is 2.50 dollars.", "2.5"),
    ("Answer: 64", "64"),
    ("We have 8 apples. The answer is unclear.", "8"),  # marker without a number: last number
    ("18 apples", "18"),
    ("He had 5 apples, ate 2, so 3 are left.", "3"),  # no marker: the last number
    ("It is -7 degrees", "-7"),
    ("It is \u221212 degrees", "-12"),  # typographic minus
    ("5-3=2", "2"),  # a '-' after a digit is subtraction
    ("10 - 4", "4"),
    ("3.14159", "3.14159"),
    ("costs $0.50 each", "0.5"),
    ("add .5 cup", "0.5"),
    ("18.00", "18"),
    ("-0", "0"),
    ("100", "100"),
    ("50% of them", "50"),
    ("1,2345", "2345"),  # not a thousands group: two numbers
    ("no number here", None),
    ("#### none", None),
    ("", None),
    (None, None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_normalize_number():
    assert normalize_number("1,234.500") == "1234.5"
    assert normalize_number("1e3") == "1000"
    assert normalize_number("0.000") == "0"
    assert normalize_number("abc") is None


def test_exact_match_uses_the_same_rule_on_both_sides():
    ref = "Ava starts with 12 and adds 7: 12 + 7 = 19.\n#### 19"
    assert exact_match("12 + 7 = 19, so the answer is 19 apples.", ref) is True
    assert exact_match("#### 19.0", ref) is True  # numeric, not textual, equality
    assert exact_match("The answer is 12.", ref) is False
    assert exact_match("I do not know", ref) is False
    assert exact_match("1,234", "1234") is True
    assert exact_match("anything 5", "a reference without numbers") is None  # not applicable


@pytest.mark.parametrize("pred, ref, expected", [
    ("the cat sat on the mat", "the cat sat on the mat", 1.0),
    ("The Cat", "the cat", 1.0),  # lower-cased
    ("a b c", "d e f", 0.0),
    ("", "a b", 0.0),
    ("a b", "", 0.0),
    (None, "a", 0.0),
    # LCS 'the cat on the mat' = 5; P = 5/6, R = 5/6
    ("the cat sat on the mat", "the cat is on the mat", 5 / 6),
    # LCS 'a c' = 2: P = 2/3, R = 2/2 -> F = 0.8
    ("a b c", "a c", 0.8),
    # order matters: LCS of 'a b c d' and 'd c b a' is 1 -> P = R = 1/4
    ("a b c d", "d c b a", 0.25),
    # whitespace of any kind separates tokens; punctuation stays attached
    ("x\ty\nz", "x y z.", 2 / 3),
])
def test_rouge_l(pred, ref, expected):
    assert rouge_l(pred, ref) == pytest.approx(expected)


def test_rouge_l_is_symmetric_f1():
    a, b = "one two three four five", "two four six"
    assert rouge_l(a, b) == pytest.approx(rouge_l(b, a))  # F1 swaps P and R
    assert rouge_l(a, b) == pytest.approx(2 * (2 / 5) * (2 / 3) / (2 / 5 + 2 / 3))


def test_mean_std():
    assert mean_std([]) == (None, None)
    assert mean_std([None, 2.0]) == (2.0, 0.0)
    m, s = mean_std([1.0, 2.0, 3.0])
    assert m == 2.0 and s == pytest.approx(1.0)  # sample std (ddof=1)


def test_token_kl_matches_the_definition():
    import torch

    torch.manual_seed(0)
    t, s = torch.randn(3, 5, 11), torch.randn(3, 5, 11)
    p, q = t.softmax(-1), s.softmax(-1)
    ref = (p * (p.log() - q.log())).sum(-1)
    kl = token_kl(t, s)
    assert kl.shape == (3, 5)
    assert torch.allclose(kl, ref, atol=1e-5)
    assert (kl >= -1e-6).all()
    assert token_kl(t, t).abs().max() < 1e-6


# --------------------------------------------------------------------------------------------
# Scoring with a fake generator (known-correct and known-wrong outputs)
# --------------------------------------------------------------------------------------------


class CharTokenizer:
    """A stand-in tokenizer: one token per character; 0 is EOS."""

    eos_token_id = 0

    def encode(self, text, add_special_tokens=True):
        return [ord(c) for c in text]

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(i) for i in ids if not (skip_special_tokens and i == 0))

    def apply_chat_template(self, msgs, add_generation_prompt=True, tokenize=True, return_dict=False):
        return self.encode("".join(f"<{m['role']}>{m['content']}" for m in msgs) + "<assistant>")


def _examples():
    from driver.evaluate import Example

    refs = ["2 + 3 = 5\n#### 5", "#### 1,200", "A reference with no number", None]
    return [Example(f"e{i}", f"question {i}?", r, extract_answer(r)) for i, r in enumerate(refs)]


def test_evaluate_with_a_fake_generator_scores_by_the_documented_rule():
    from driver.evaluate import encode_prompts, evaluate

    tok, examples = CharTokenizer(), _examples()
    prompts = encode_prompts(tok, examples, "sys", True)
    outputs = {0: "2 + 3 = 5. The answer is 5 apples.", 1: "#### 1200", 2: "whatever 3", 3: "nothing"}
    calls = []

    def generate_fn(batch, seed=None):
        calls.append((len(batch), seed))
        return [tok.encode(outputs[prompts.index(p)]) + [0] for p in batch]

    res = evaluate(generate_fn, tok, examples, prompts, batch_size=3)
    assert calls == [(3, None), (1, None)]  # greedy, in chunks
    m = res["metrics"]
    assert m["exact_match"] == 1.0  # both numeric references right; the other two not applicable
    assert m["exact_match_std"] == 0.0
    assert m["answer_rate"] == 0.75  # 'nothing' has no number
    ex = res["examples"]
    assert [e["correct"] for e in ex] == [True, True, None, None]
    assert [e["extracted_answer"] for e in ex] == ["5", "1200", "3", None]
    assert ex[0]["prediction"] == outputs[0] and ex[0]["reference_answer"] == "5"
    assert ex[2]["rouge_l"] == 0.0 and ex[3]["rouge_l"] is None
    assert m["rouge_l"] == pytest.approx(sum(rouge_l(outputs[i], examples[i].reference) for i in range(3)) / 3)


def test_evaluate_over_seeds_reports_mean_and_spread():
    from driver.evaluate import encode_prompts, evaluate

    tok, examples = CharTokenizer(), _examples()[:2]
    prompts = encode_prompts(tok, examples, None, False)

    def generate_fn(batch, seed=None):  # seed 7*1_000_003 (chunk 0) answers right, others wrong
        right = seed == 7 * 1_000_003
        return [tok.encode("#### 5 extra" if right and p == prompts[0] else "#### 0 extra") for p in batch]

    res = evaluate(generate_fn, tok, examples, prompts, seeds=[7, 8, 9], batch_size=8, max_new_tokens=6)
    assert [r["seed"] for r in res["runs"]] == [7, 8, 9]
    assert [r["exact_match"] for r in res["runs"]] == [0.5, 0.0, 0.0]
    assert res["metrics"]["exact_match"] == pytest.approx(1 / 6)
    assert res["metrics"]["exact_match_std"] == pytest.approx(math.sqrt(((1 / 3) ** 2 + 2 * (1 / 6) ** 2) / 2))
    assert len(res["examples"]) == 6 and res["examples"][0]["prediction"] == "#### 5"  # cut to 6 tokens


def test_periodic_eval(tmp_path):
    import json

    from driver.config import Config, DataConfig, EvalConfig
    from driver.evaluate import PeriodicEval

    data = tmp_path / "held_out.jsonl"
    data.write_text("\n".join(json.dumps({"q": f"What is {i} + {i}?", "a": f"#### {2 * i}"}) for i in range(5)))
    cfg = Config(data=DataConfig(system_prompt=None),
                 eval=EvalConfig(every_steps=3, source=str(data), prompt_field="q", answer_field="a", limit=4))
    tok = CharTokenizer()
    ev = PeriodicEval(cfg, tok)
    assert [ev.due(s) for s in range(7)] == [False, False, False, True, False, False, True]
    assert len(ev.prompts) == 4

    def greedy(prompts):  # right on the first two prompts only
        return [tok.encode(f"#### {2 * i}" if i < 2 else "#### 99") for i in range(len(prompts))]

    row = ev.run(greedy)
    assert row["eval_exact_match"] == 0.5 and row["eval_answer_rate"] == 1.0
    assert 0 < row["eval_rouge_l"] <= 1 and row["eval_s"] >= 0
    assert "eval_exact_match_std" not in row

    cfg.eval.seeds = [0, 1]
    ev = PeriodicEval(cfg, tok)
    row = ev.run(lambda prompts, seed=None: greedy(prompts) if seed == 0 else [[] for _ in prompts])
    assert row["eval_exact_match"] == 0.25 and row["eval_exact_match_std"] == pytest.approx(math.sqrt(0.125))
    assert PeriodicEval(Config(), tok).due(5) is False  # every_steps 0: never


def test_periodic_eval_synthetic_math_is_held_out():
    from driver.config import Config
    from driver.evaluate import PeriodicEval
    from kd.data import synthetic_math

    cfg = Config()
    cfg.eval.limit = 5
    ev = PeriodicEval(cfg, CharTokenizer())
    train = {r["question"] for r in synthetic_math(256, cfg.run.seed)}
    assert len(ev.examples) == 5 and not {e.question for e in ev.examples} & train
    assert all(e.answer is not None and e.reference.endswith(f"#### {e.answer}") for e in ev.examples)


def test_load_examples_errors(tmp_path):
    from driver.evaluate import load_examples
    from kd.errors import UserInputError

    with pytest.raises(UserInputError, match="file does not exist"):
        load_examples(str(tmp_path / "missing.jsonl"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(UserInputError, match="no rows"):
        load_examples(str(empty))
    with pytest.raises(UserInputError, match="field 'question' is missing"):
        bad = tmp_path / "bad.jsonl"
        bad.write_text('{"text": "x"}\n')
        load_examples(str(bad))


# --------------------------------------------------------------------------------------------
# Ray metrics helpers: safe outside Ray
# --------------------------------------------------------------------------------------------


def test_ray_metrics_are_noops_outside_ray(monkeypatch):
    import ray

    from actors import metrics

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    metrics.record_generation("sampler-0", 3, 30, 0.5)
    metrics.record_buffer(5, capacity=8)
    metrics.record_step({"loss": None, "policy_lag": float("nan"), "weight_sync_s": 0.1})
    metrics.record_step({})
    assert set(metrics.NAMES) == {"raykd_samples_generated_total", "raykd_tokens_per_second",
                                  "raykd_buffer_size", "raykd_buffer_capacity", "raykd_learner_loss",
                                  "raykd_policy_lag", "raykd_weight_sync_seconds",
                                  *metrics.HEALTH_GAUGES.values()}
