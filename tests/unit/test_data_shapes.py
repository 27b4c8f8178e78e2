"""Datasets in the shapes TRL users have: a conversational `messages` column and `prompt`/`completion`
columns (plain or conversational), in JSONL, Parquet and Hugging Face datasets, with one-line errors."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kd.data import DataError, load_prompts

CHAT = [
    {"messages": [{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": "What is 2 + 3?"},
                  {"role": "assistant", "content": "2 + 3 = 5\n#### 5"}]},
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                  {"role": "user", "content": "How many legs has a cat?"}]},  # no reply: no reference
    {"messages": [{"role": "user", "content": "First?"}, {"role": "assistant", "content": "one"},
                  {"role": "user", "content": "Second?"}, {"role": "assistant", "content": "two"}]},
]
# what each row must give: the last user turn, the reply after it (GSM8K '####' read as everywhere)
CHAT_EXPECTED = [("What is 2 + 3?", "5"), ("How many legs has a cat?", None), ("Second?", "two")]

PROMPT_COMPLETION = [
    {"prompt": "Name a prime.", "completion": "7"},
    {"prompt": [{"role": "user", "content": "Capital of France?"}],
     "completion": [{"role": "assistant", "content": "Paris"}]},
    {"prompt": "No answer here."},
]
PC_EXPECTED = [("Name a prime.", "7"), ("Capital of France?", "Paris"), ("No answer here.", None)]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _parquet(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def _hf(path, rows):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return f"hf:{path}"


WRITERS = {"jsonl": lambda d, rows: _jsonl(d / "d.jsonl", rows),
           "parquet": lambda d, rows: _parquet(d / "d.parquet", rows),
           "hf": lambda d, rows: _hf(d / "ds", rows)}


@pytest.mark.parametrize("fmt", WRITERS)
@pytest.mark.parametrize("rows,expected", [(CHAT, CHAT_EXPECTED), (PROMPT_COMPLETION, PC_EXPECTED)],
                         ids=["messages", "prompt_completion"])
def test_trl_shapes_in_every_format(tmp_path, fmt, rows, expected):
    if fmt != "jsonl" and rows is PROMPT_COMPLETION:
        # Arrow needs one type per column: the conversational and plain prompt-completion rows apart
        for part, want in ((rows[::2], expected[::2]), (rows[1:2], expected[1:2])):
            sub = tmp_path / str(len(want))
            sub.mkdir()
            recs = load_prompts(WRITERS[fmt](sub, part), "question", "answer", 0, 0)
            assert [(r.question, r.answer) for r in recs] == want
        return
    recs = load_prompts(WRITERS[fmt](tmp_path, rows), "question", "answer", 0, 0)
    assert [(r.question, r.answer) for r in recs] == expected


def test_configured_fields_still_win(tmp_path):
    """A dataset with the configured field reads it, even when it also has a 'prompt' column."""
    src = _jsonl(tmp_path / "d.jsonl", [{"question": "Q?", "answer": "#### 3", "prompt": "ignored"}])
    [rec] = load_prompts(src, "question", "answer", 0, 0)
    assert (rec.question, rec.answer) == ("Q?", "3")


def test_messages_as_the_configured_prompt_field(tmp_path):
    src = _jsonl(tmp_path / "d.jsonl", [{"conv": [{"role": "user", "content": "Q?"}], "answer": "4"}])
    [rec] = load_prompts(src, "conv", "answer", 0, 0)
    assert (rec.question, rec.answer) == ("Q?", "4")  # no assistant turn: the answer field is the reference


@pytest.mark.parametrize("rows,error", [
    ([CHAT[0], {"text": "x"}], "d.jsonl:2: field 'messages' is missing (row has: text)"),
    ([{"messages": "hello"}], "d.jsonl:1: field 'messages' must be a list of {role, content} messages, got str"),
    ([{"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}]}],
     "d.jsonl:1: field 'messages' has no user turn (roles: system, assistant)"),
    ([{"messages": [{"role": "user", "content": "q"}, "oops"]}],
     "d.jsonl:1: field 'messages[1]' must be a {role, content} message, got \"oops\""),
    ([{"messages": [{"role": "user", "content": 3}]}], "d.jsonl:1: field 'messages[0].content' must be a string, got int"),
    ([{"messages": [{"role": "user", "content": "  "}]}], "d.jsonl:1: field 'messages[0].content' is empty"),
    ([{"prompt": 5}], "d.jsonl:1: field 'prompt' must be a string, got int"),
    ([{"prompt": "p", "completion": {"a": 1}}],
     "d.jsonl:1: field 'completion' must be a string or a list of messages, got dict"),
])
def test_one_line_errors(tmp_path, rows, error):
    src = _jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataError) as e:
        load_prompts(src, "question", "answer", 0, 0)
    msg = str(e.value)
    assert "\n" not in msg and msg == f"{tmp_path / 'd.jsonl'}:{error.split(':', 1)[1]}"


def test_hf_error_names_the_dataset_and_row(tmp_path):
    src = _hf(tmp_path / "ds", [{"messages": [{"role": "assistant", "content": "a"}]}])
    with pytest.raises(DataError, match=rf"^{src}:1: field 'messages' has no user turn \(roles: assistant\)$"):
        load_prompts(src, "question", "answer", 0, 0)


def test_held_out_eval_reads_the_shapes_with_the_whole_reference(tmp_path):
    """eval.source / `raykd eval --data`: the reference text (Rouge-L, KL) is the assistant turn or the
    completion, whole; exact match reads its number."""
    from driver.evaluate import load_examples

    src = _jsonl(tmp_path / "e.jsonl", CHAT)
    ex = load_examples(src)
    assert [(e.question, e.reference, e.answer) for e in ex] == [
        ("What is 2 + 3?", "2 + 3 = 5\n#### 5", "5"), ("How many legs has a cat?", None, None),
        ("Second?", "two", None)]
    src = _parquet(tmp_path / "e.parquet", [{"prompt": "Name a prime.", "completion": "It is 7."}])
    [e] = load_examples(src)
    assert (e.question, e.reference, e.answer) == ("Name a prime.", "It is 7.", "7")
