"""The text path: a teacher whose tokenizer is not the student's (docs/teachers.md). Tiny models with
genuinely different vocabularies (BPE trained to 491 vs 320 tokens), no Ray."""

import math

import pyarrow as pa
import pytest
import torch

from actors.engines import Generation
from actors.teacher_pool import TeacherWorker
from driver.config import load_config
from driver.prepare import SetupError, prepare
from kd.data import BUFFER_SCHEMA, synthetic_math, with_optional_columns
from kd.objective import compute_loss


@pytest.fixture(scope="module")
def toks(tiny_models, tiny_teacher_other_tokenizer):
    from transformers import AutoTokenizer

    return (AutoTokenizer.from_pretrained(tiny_models["student"]),
            AutoTokenizer.from_pretrained(tiny_teacher_other_tokenizer))


def cfg_for(tiny_models, teacher, tmp_path, *sets):
    return load_config(None, [f"models.teacher={teacher}", f"models.student={tiny_models['student']}",
                              f"models.cache_dir={tmp_path / 'cache'}", "data.num_prompts=4", *sets])


def chat(tok, text):
    return list(tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                        tokenize=True, return_dict=False))


def teacher_logp(model, prompt: list[int], cont: list[int]) -> float:
    """log p(cont | prompt) under ``model``, by a plain forward over the whole sequence."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + cont])).logits[0].float().log_softmax(-1)
    return sum(float(logits[len(prompt) - 1 + j, t]) for j, t in enumerate(cont))


def logps_of(model, prompt: list[int], cont: list[int]) -> torch.Tensor:
    """log q(cont_j | prompt, cont_<j) for each j, with the gradient (a plain forward, one sequence)."""
    logits = model(torch.tensor([prompt + cont])).logits[0].float().log_softmax(-1)
    return torch.stack([logits[len(prompt) - 1 + j, t] for j, t in enumerate(cont)])


def test_the_tiny_tokenizers_really_differ(toks):
    s_tok, t_tok = toks
    text = "Sara reads 20 pages on Monday."
    assert len(s_tok) != len(t_tok) and s_tok.encode(text) != t_tok.encode(text)
    assert s_tok.decode(s_tok.encode(text)) == t_tok.decode(t_tok.encode(text)) == text


def test_text_path_rows_round_trip_the_teachers_text_and_score_the_students_text(
        tiny_models, tiny_teacher_other_tokenizer, toks):
    from transformers import AutoModelForCausalLM

    s_tok, t_tok = toks
    w = TeacherWorker(0, tiny_teacher_other_tokenizer, "hf", {}, {"max_new_tokens": 10, "temperature": 1.0,
                                                                  "top_p": 1.0}, top_k=4,
                      student_tokenizer=tiny_models["student"])
    made = []
    generate = w.engine.generate
    w.engine.generate = lambda prompts, params: made.extend(generate(prompts, params)) or made  # a spy
    question = "Tom has 3 apples and buys 5 more. How many apples does he have now?"
    req = {"prompt_id": "p0", "prompt_ids": chat(s_tok, question), "teacher_prompt_ids": chat(t_tok, question),
           "teacher_plain_prompt_ids": chat(t_tok, question), "priming": "none", "reference_answer": "8"}
    # y_s in the student's tokens: one that ended with the student's EOS, one cut off by the budget
    said = ["Sara reads 20 pages on Monday, so 8.", "A baker makes 12 loaves each day"]
    y_s = [s_tok.encode(said[0]) + [s_tok.eos_token_id], s_tok.encode(said[1])]
    student = [Generation(y_s[0], [-1.0] * len(y_s[0]), "stop", 2), Generation(y_s[1], [-1.0] * len(y_s[1]), "length", 2)]
    rows = w.make_pairs([req, {**req, "prompt_id": "p1"}], student).to_pylist()

    # chosen: the teacher's generated text, in the student's tokens (EOS only if the teacher stopped)
    for row, gen in zip(rows, made):
        stopped = gen.finish_reason == "stop"
        t_ids = gen.token_ids[:-1] if stopped else gen.token_ids
        text = t_tok.decode(t_ids, skip_special_tokens=True)
        s_ids = row["chosen_ids"][:-1] if stopped else row["chosen_ids"]
        assert s_tok.decode(s_ids, skip_special_tokens=True) == text
        assert (row["chosen_ids"][-1:] == [s_tok.eos_token_id]) == stopped
        assert row["chosen_teacher_logp_sum"] == pytest.approx(sum(gen.logprobs), abs=1e-4)
        assert row["chosen_teacher_logps"] == [] and row["chosen_topk_ids"] is None

    # rejected: the teacher's log-prob of y_s's TEXT under its own tokenizer, by a plain HF forward
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher_other_tokenizer, dtype=torch.float32)
    in_teacher = [t_tok.encode(said[0], add_special_tokens=False) + [t_tok.eos_token_id],
                  t_tok.encode(said[1], add_special_tokens=False)]  # the truncated one gets no EOS
    assert in_teacher[0][:-1] != y_s[0][:-1]  # other token ids for the same text
    for row, ids, own in zip(rows, in_teacher, y_s):
        assert row["rejected_teacher_logp_sum"] == pytest.approx(teacher_logp(model, req["teacher_prompt_ids"], ids),
                                                                 abs=1e-3)
        assert row["rejected_ids"] == own and row["rejected_teacher_logps"] == []
        assert row["prompt_ids"] == req["prompt_ids"] and row["teacher_prompt_ids"] == req["teacher_prompt_ids"]


def text_rows(n=3) -> pa.Table:
    g = torch.Generator().manual_seed(0)
    ids = lambda k: torch.randint(3, 400, (k,), generator=g).tolist()  # noqa: E731
    return pa.Table.from_pylist([{
        "prompt_id": f"p{i}", "prompt_ids": ids(4), "teacher_prompt_ids": ids(3), "chosen_ids": ids(3 + i),
        "rejected_ids": ids(2 + i), "chosen_teacher_logps": [], "rejected_teacher_logps": [],
        "rejected_behaviour_logps": [-1.0] * (2 + i), "policy_version": 0, "priming": "none", "created_at": 0.0,
        "chosen_teacher_logp_sum": -3.0 - i, "rejected_teacher_logp_sum": -20.0 - 2 * i} for i in range(n)],
        schema=BUFFER_SCHEMA)


def test_dpkd_on_text_path_rows_uses_the_teachers_sums(tiny_models):
    from transformers import AutoModelForCausalLM

    from driver.config import LossConfig

    model = AutoModelForCausalLM.from_pretrained(tiny_models["student"], dtype=torch.float32)
    table = text_rows()
    cfg = LossConfig(type="dpkd", kd_coef=1.0, sft_coef=0.0, beta=0.5)
    loss, metrics = compute_loss(model, table, cfg, pad_id=0)
    # by hand: -log sigmoid(beta/|y_t| (log q(y_t) - T_t) - beta/|y_s| (log q(y_s) - T_s)), mean over rows
    expect = []
    for r in table.to_pylist():
        qc, qr = teacher_logp(model, r["prompt_ids"], r["chosen_ids"]), teacher_logp(model, r["prompt_ids"], r["rejected_ids"])
        z = (0.5 / len(r["chosen_ids"]) * (qc - r["chosen_teacher_logp_sum"])
             - 0.5 / len(r["rejected_ids"]) * (qr - r["rejected_teacher_logp_sum"]))
        expect.append(math.log1p(math.exp(-z)))
    assert float(loss.detach()) == pytest.approx(sum(expect) / len(expect), abs=1e-4)
    assert math.isfinite(metrics["reward_margin"])


def test_pg_rkl_on_text_path_rows_is_reinforce_on_the_sequence_reward(tiny_models):
    """On-policy (student = behaviour, so the ratio is 1 and no clipping binds): the loss is
    -sum_b A_b * sum_t log q(y_t) / N with A_b = T_b - log q(y_s) held constant, so its value is
    -sum_b A_b * |y_s,b| / N and its gradient that of -sum_b A_b * log q(y_s,b) / N."""
    from transformers import AutoModelForCausalLM

    from driver.config import LossConfig

    model = AutoModelForCausalLM.from_pretrained(tiny_models["student"], dtype=torch.float32)
    table = text_rows()
    rows = table.to_pylist()
    with torch.no_grad():
        q = [float(logps_of(model, r["prompt_ids"], r["rejected_ids"]).sum()) for r in rows]
        for r in rows:  # the sampler's log-probs of its own tokens: the current student's
            r["rejected_behaviour_logps"] = logps_of(model, r["prompt_ids"], r["rejected_ids"]).tolist()
    table = pa.Table.from_pylist(rows, schema=BUFFER_SCHEMA)
    n = sum(len(r["rejected_ids"]) for r in rows)
    adv = [r["rejected_teacher_logp_sum"] - qb for r, qb in zip(rows, q)]
    cfg = LossConfig(type="pg_rkl", kd_coef=1.0, sft_coef=0.0)
    model.zero_grad()
    loss, metrics = compute_loss(model, table, cfg, pad_id=0)
    loss.backward()
    got = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    assert float(loss.detach()) == pytest.approx(-sum(a * len(r["rejected_ids"]) for a, r in zip(adv, rows)) / n,
                                                 rel=1e-4)
    assert metrics["reverse_kl"] == pytest.approx(-sum(adv) / n, rel=1e-4)
    model.zero_grad()
    ref = -sum(a * logps_of(model, r["prompt_ids"], r["rejected_ids"]).sum() for a, r in zip(adv, rows)) / n
    ref.backward()
    for k, p in model.named_parameters():
        if p.grad is not None:
            assert torch.allclose(got[k], p.grad, rtol=1e-3, atol=1e-6), k


@pytest.mark.parametrize("loss", ["fkl", "dpkd_token"])
def test_token_level_losses_on_text_path_rows_are_refused_by_the_learner(tiny_models, loss):
    from transformers import AutoModelForCausalLM

    from driver.config import LossConfig

    model = AutoModelForCausalLM.from_pretrained(tiny_models["student"], dtype=torch.float32)
    with pytest.raises(ValueError, match=f"loss.type={loss} needs the teacher's log-probs token by token.*dpkd or sft or pg_rkl"):
        compute_loss(model, text_rows(), LossConfig(type=loss), pad_id=0)


def test_rows_from_before_the_sum_columns_load_with_nulls():
    old = text_rows(2).drop_columns(["chosen_teacher_logp_sum", "rejected_teacher_logp_sum"])
    table = with_optional_columns(old).cast(BUFFER_SCHEMA)
    assert table.column("chosen_teacher_logp_sum").to_pylist() == [None, None]
    assert table.drop_columns(["chosen_teacher_logp_sum", "rejected_teacher_logp_sum"]).equals(old)
    older = old.drop_columns(["teacher_name"])
    assert with_optional_columns(older).cast(BUFFER_SCHEMA).column("teacher_name").to_pylist() == [None, None]


# -- prepare: the text path is detected, stated, and refused for what cannot work on it ---------------


@pytest.mark.parametrize("sets, bad", [
    (["loss.type=fkl"], "loss.type=fkl"),
    (["loss.type=rkl"], "loss.type=rkl"),
    (["schedule=[{kind: offline, steps: 2, loss: {type: sft}}, {kind: online, steps: 2, loss: {type: jsd}}]"],
     "schedule[1].loss.type=jsd"),
])
def test_a_token_level_loss_across_tokenizers_is_refused_before_ray(tiny_models, tiny_teacher_other_tokenizer,
                                                                     tmp_path, sets, bad):
    cfg = cfg_for(tiny_models, tiny_teacher_other_tokenizer, tmp_path, *sets)
    with pytest.raises(SetupError) as e:
        prepare(cfg, str(tmp_path / "run"))
    msg = str(e.value)
    assert "\n" not in msg and "vocab 320" in msg and "vocab 491" in msg and "different tokenizers" in msg
    assert f"but {bad} needs" in msg and msg.endswith("use loss.type dpkd or sft or pg_rkl (docs/teachers.md)")
    assert not (tmp_path / "run").exists()


def test_eval_teacher_across_tokenizers_is_refused(tiny_models, tiny_teacher_other_tokenizer, tmp_path):
    cfg = cfg_for(tiny_models, tiny_teacher_other_tokenizer, tmp_path, "eval.teacher=true")
    with pytest.raises(SetupError, match=r"^eval.teacher: models.teacher .* raykd eval --model"):
        prepare(cfg, str(tmp_path / "run"))


def test_dpkd_across_tokenizers_takes_the_text_path_and_says_so(tiny_models, tiny_teacher_other_tokenizer,
                                                                 tmp_path, toks, capsys):
    s_tok, t_tok = toks
    cfg = cfg_for(tiny_models, tiny_teacher_other_tokenizer, tmp_path, "data.system_prompt=null")
    prep = prepare(cfg, str(tmp_path / "run"))
    assert prep.text_pools == {"default"}
    assert capsys.readouterr().err.strip() == (
        "raykd: text path: models.teacher (tokenizer vocab 320) and models.student (tokenizer vocab 491) use "
        "different tokenizers; responses cross between them as text; losses that work: dpkd, sft, pg_rkl")
    questions = [row["question"] for row in synthetic_math(4, cfg.run.seed)]
    assert [r["prompt_id"] for r in prep.requests] == [row["id"] for row in synthetic_math(4, cfg.run.seed)]
    for r, q in zip(prep.requests, questions):  # each prompt through each model's own tokenizer and template
        assert r["prompt_ids"] == chat(s_tok, q)
        assert r["teacher_prompt_ids"] == r["teacher_plain_prompt_ids"] == chat(t_tok, q) != r["prompt_ids"]


def test_one_tokenizer_keeps_the_fast_path(tiny_models, tmp_path, capsys):
    cfg = cfg_for(tiny_models, tiny_models["teacher"], tmp_path, "loss.type=fkl")
    prep = prepare(cfg, str(tmp_path / "run"))
    assert prep.text_pools == frozenset() and "text path" not in capsys.readouterr().err
    assert all(r["teacher_prompt_ids"] == r["prompt_ids"] and "teacher_plain_prompt_ids" not in r
               for r in prep.requests)


def test_tiny_spec_with_a_vocab_builds_another_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    from kd.models import ModelSpecError, resolve_model

    path = resolve_model("tiny:1:0:300", tmp_path)
    assert path.name == "tiny-l1-s0-v300" and len(AutoTokenizer.from_pretrained(path)) == 300
    with pytest.raises(ModelSpecError, match=r"expected tiny\[:LAYERS\[:SEED\[:VOCAB\]\]\] with VOCAB in \[300, 512\]"):
        resolve_model("tiny:1:0:99", tmp_path)
