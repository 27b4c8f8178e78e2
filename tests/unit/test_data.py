"""Prompt readers and the built-in generator: every bad row names file, row and field."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kd.data import BUFFER_SCHEMA, DataError, final_answer, load_prompts, read_prompts, synthetic_math


def test_synthetic_math_is_deterministic_and_answers_are_right():
    a, b = synthetic_math(50, seed=3), synthetic_math(50, seed=3)
    assert a == b
    assert synthetic_math(50, seed=4) != a
    assert len({r["question"] for r in a}) > 40  # varied problems
    for r in a:
        ans = final_answer(r["answer"])
        assert ans is not None and ans.lstrip("-").isdigit()
        # the worked solution's last equation ends in the answer
        assert r["answer"].split("\n")[0].rstrip(".").endswith(ans)


def test_synthetic_math_solutions_do_their_arithmetic_right():
    # every "a op b [op c] = d" in the worked solutions, evaluated by Python, over all templates
    import re

    rows = synthetic_math(2000, seed=1)
    checked = 0
    for r in rows:
        for m in re.finditer(r"(\d+(?: [-+*/] \d+)+) = (\d+)", r["answer"]):
            assert eval(m.group(1)) == int(m.group(2)), r["answer"]  # noqa: S307 (digits and operators only)
            checked += 1
    assert checked > 3000
    # varied: a name and item are copied from each question, not drawn from a handful
    assert len({r["question"].split()[0] for r in rows}) > 100


def test_final_answer_gsm8k_format():
    assert final_answer("She has 3 + 4 = 7 apples.\n#### 7") == "7"
    assert final_answer("#### 1,234") == "1234"
    assert final_answer("42") == "42"
    assert final_answer(None) is None


def write_jsonl(path, rows):
    path.write_text("".join((json.dumps(r) if not isinstance(r, str) else r) + "\n" for r in rows))
    return path


def test_jsonl_with_custom_fields(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [{"q": "What is 2+2?", "a": "#### 4"}, {"q": "1+1?", "a": 2}])
    recs = read_prompts(p, prompt_field="q", answer_field="a")
    assert [r.question for r in recs] == ["What is 2+2?", "1+1?"]
    assert [r.answer for r in recs] == ["4", "2"]
    assert recs[0].prompt_id == "d-1"


def test_parquet(tmp_path):
    p = tmp_path / "d.parquet"
    pq.write_table(pa.table({"question": ["a?", "b?"], "answer": ["#### 1", "#### 2"], "id": ["x", "y"]}), p)
    recs = read_prompts(p)
    assert [(r.prompt_id, r.answer) for r in recs] == [("x", "1"), ("y", "2")]


@pytest.mark.parametrize(
    "lines, expect",
    [
        ([{"question": "ok"}, {"prompt": "no question"}], "d.jsonl:2: field 'question' is missing"),
        ([{"question": 5}], "d.jsonl:1: field 'question' must be a string, got int"),
        ([{"question": "   "}], "d.jsonl:1: field 'question' is empty"),
        (["{not json"], "d.jsonl:1: invalid JSON"),
        (["[1, 2]"], "d.jsonl:1: expected a JSON object"),
        ([{"question": "q", "answer": [1]}], "d.jsonl:1: field 'answer' must be a string or number"),
        ([], "d.jsonl: no rows (empty dataset)"),
    ],
)
def test_bad_rows(tmp_path, lines, expect):
    p = write_jsonl(tmp_path / "d.jsonl", lines)
    with pytest.raises(DataError) as e:
        read_prompts(p)
    assert expect in str(e.value)


def test_non_utf8_and_missing_file(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_bytes(b'{"question": "ok"}\n{"question": "\xff\xfe"}\n')
    with pytest.raises(DataError, match=r"d.jsonl:2: not valid UTF-8"):
        read_prompts(p)
    with pytest.raises(DataError, match="does not exist"):
        read_prompts(tmp_path / "nope.jsonl")


def test_load_prompts_synthetic():
    recs = load_prompts("synthetic_math", "question", "answer", 10, seed=1)
    assert len(recs) == 10 and all(r.answer for r in recs)


def test_buffer_schema_has_the_design_fields():
    for name in ["prompt_id", "prompt_ids", "teacher_prompt_ids", "chosen_ids", "rejected_ids",
                 "chosen_teacher_logps", "rejected_teacher_logps", "rejected_topk_ids",
                 "rejected_topk_logps", "rejected_behaviour_logps", "policy_version", "created_at",
                 "reference_answer", "priming"]:
        assert name in BUFFER_SCHEMA.names


def test_hugging_face_dataset_saved_to_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    d = datasets.DatasetDict({"train": datasets.Dataset.from_dict(
        {"problem": ["What is 2+2?", "What is 3+3?"], "solution": ["#### 4", "#### 6"]})})
    d.save_to_disk(str(tmp_path / "ds"))
    recs = load_prompts(f"hf:{tmp_path / 'ds'}:train", "problem", "solution", 0, 0)
    assert [(r.question, r.answer) for r in recs] == [("What is 2+2?", "4"), ("What is 3+3?", "6")]
    with pytest.raises(DataError, match="field 'question' is missing"):
        load_prompts(f"hf:{tmp_path / 'ds'}", "question", "answer", 0, 0)
    with pytest.raises(DataError, match="no split 'test'"):
        load_prompts(f"hf:{tmp_path / 'ds'}:test", "problem", "solution", 0, 0)
