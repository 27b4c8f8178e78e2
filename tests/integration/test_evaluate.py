"""`raykd eval` on tiny random models: structure, finite values, the documented scoring rule, errors."""

import json
import math
import shutil

import pytest
import yaml

from driver.cli import main
from kd.metrics import extract_answer, rouge_l

ROWS = [
    {"question": "Tom has 3 apples and buys 5 more. How many apples?", "answer": "3 + 5 = 8\n#### 8"},
    {"question": "A baker makes 12 loaves for 4 days. How many loaves?", "answer": "12 * 4 = 48\n#### 48"},
    {"question": "What is 1,000 + 234?", "answer": "#### 1,234"},
    {"question": "Not used: beyond --limit", "answer": "#### 0"},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def check_examples(result):
    for ex in result["examples"]:
        assert set(ex) >= {"question", "reference", "prediction", "extracted_answer", "correct", "rouge_l"}
        assert isinstance(ex["prediction"], str)
        # exact match is the documented rule, whatever the (random) model wrote
        assert ex["extracted_answer"] == extract_answer(ex["prediction"])
        assert ex["correct"] == (ex["extracted_answer"] == extract_answer(ex["reference"]))
        assert ex["rouge_l"] == pytest.approx(rouge_l(ex["prediction"], ex["reference"]))


def test_eval_a_model_dir_with_teacher_kl(tiny_models, tmp_path, capsys):
    data = write_jsonl(tmp_path / "gsm.jsonl", ROWS)
    out = tmp_path / "res" / "eval.json"
    code = main(["eval", "--model", tiny_models["student"], "--data", str(data), "--limit", "3",
                 "--max-new-tokens", "8", "--teacher", tiny_models["teacher"], "--out", str(out), "--no-progress"])
    assert code == 0
    table = capsys.readouterr().out
    assert "3 examples, greedy" in table and "exact_match" in table and "kl_teacher_student" in table
    res = json.loads(out.read_text())
    assert res["num_examples"] == 3 and res["mode"] == "greedy" and len(res["examples"]) == 3
    assert [ex["reference"] for ex in res["examples"]] == [r["answer"] for r in ROWS[:3]]
    assert [ex["reference_answer"] for ex in res["examples"]] == ["8", "48", "1234"]
    check_examples(res)
    m = res["metrics"]
    assert m["exact_match"] == pytest.approx(sum(ex["correct"] for ex in res["examples"]) / 3)
    for key in ("exact_match", "rouge_l", "answer_rate", "kl_teacher_student"):
        assert math.isfinite(m[key]) and m[key] >= 0
    assert m["exact_match_std"] == 0.0  # one (greedy) run
    assert m["kl_tokens"] > 0 and m["kl_teacher_student"] > 0  # two different random models


def test_eval_a_run_dir_uses_its_config(tiny_models, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_models["student"], run / "final")
    cfg = {"run": {"seed": 3}, "models": {"teacher": tiny_models["teacher"]},
           "data": {"system_prompt": None, "chat_template": True, "max_prompt_tokens": 64},
           "eval": {"source": "synthetic_math", "limit": 2, "max_new_tokens": 6, "seeds": [0, 1]}}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "eval.json"
    assert main(["eval", "--model", str(run), "--out", str(out), "--no-progress"]) == 0
    res = json.loads(out.read_text())
    assert res["run_dir"] == str(run) and res["model"] == str(run / "final")
    assert res["data"] == "synthetic_math" and res["num_examples"] == 2
    assert res["mode"] == "sampled" and res["seeds"] == [0, 1] and res["max_new_tokens"] == 6
    assert [r["seed"] for r in res["runs"]] == [0, 1] and len(res["examples"]) == 4
    assert all(ex["id"].startswith("synth-10003-") for ex in res["examples"])  # held-out seed
    check_examples(res)
    m = res["metrics"]
    assert math.isfinite(m["rouge_l_std"]) and m["rouge_l_std"] >= 0
    assert "kl_teacher_student" in m  # the teacher came from config.yaml
    assert "2 sampled runs (seeds 0,1" in capsys.readouterr().out


@pytest.mark.parametrize("case", ["missing_model", "not_a_model", "missing_data", "empty_data", "bad_seeds",
                                  "no_data"])
def test_eval_bad_input_is_one_line(tiny_models, tmp_path, capsys, case):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS[:1])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    (tmp_path / "junk").mkdir()
    model, extra = tiny_models["student"], ["--data", str(data)]
    expected = {
        "missing_model": f"--model {tmp_path / 'nope'}: does not exist",
        "not_a_model": f"--model {tmp_path / 'junk'}: neither a Hugging Face model directory",
        "missing_data": f"{tmp_path / 'missing.jsonl'}: file does not exist",
        "empty_data": f"{empty}: no rows (empty dataset)",
        "bad_seeds": "--seeds 'a,b': expected comma-separated integers",
        "no_data": "--data is required",
    }[case]
    if case == "missing_model":
        model = str(tmp_path / "nope")
    elif case == "not_a_model":
        model = str(tmp_path / "junk")
    elif case == "missing_data":
        extra = ["--data", str(tmp_path / "missing.jsonl")]
    elif case == "empty_data":
        extra = ["--data", str(empty)]
    elif case == "bad_seeds":
        extra += ["--seeds", "a,b"]
    elif case == "no_data":
        extra = []
    assert main(["eval", "--model", model, *extra, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("raykd: error: ") and expected in err and len(err.splitlines()) == 1
