"""Bad input stops `raykd train` before any actor starts, with one line naming what and where."""

import json
import subprocess
import sys
import time

import yaml

from driver.cli import main


def run(tmp_path, capsys, data: dict, *extra) -> tuple[int, str]:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(data))
    code = main(["train", str(cfg), "--run-dir", str(tmp_path / "run"), "--no-progress", *extra])
    return code, capsys.readouterr().err.strip()


def test_typo_in_a_config_key(tmp_path, capsys):
    code, err = run(tmp_path, capsys, {"learner": {"max_step": 3}})
    assert code == 2
    assert err.startswith("raykd: error: learner.max_step: unknown key (allowed: batch_size, ")
    assert "max_steps" in err and len(err.splitlines()) == 1


def test_bad_override_value(tmp_path, capsys):
    code, err = run(tmp_path, capsys, {}, "--set", "sampler.num_replicas=0")
    assert code == 2 and err == "raykd: error: sampler.num_replicas=0: must be a positive integer"


def test_missing_model_path(tmp_path, capsys):
    code, err = run(tmp_path, capsys, {"models": {"teacher": str(tmp_path / "no-model")}})
    assert code == 2
    assert err.startswith(f"raykd: error: model path '{tmp_path / 'no-model'}' does not exist")
    assert not (tmp_path / "run").exists()  # nothing was started or written


def test_dataset_row_without_prompt_field(tmp_path, capsys):
    data = tmp_path / "prompts.jsonl"
    data.write_text(json.dumps({"question": "ok?"}) + "\n" + json.dumps({"text": "no field"}) + "\n")
    code, err = run(tmp_path, capsys, {"data": {"source": str(data)}})
    assert code == 2
    assert err.startswith(f"raykd: error: {data}:2: field 'question' is missing")
    assert len(err.splitlines()) == 1


def test_empty_dataset(tmp_path, capsys):
    data = tmp_path / "empty.jsonl"
    data.write_text("")
    code, err = run(tmp_path, capsys, {"data": {"source": str(data)}})
    assert code == 2 and err == f"raykd: error: {data}: no rows (empty dataset)"


def test_console_script_exits_nonzero_fast(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("loss: {type: klx}\n")
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "driver.cli", "train", str(cfg)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("raykd: error: loss.type='klx': must be one of dpkd")
    assert time.perf_counter() - t < 30  # no cluster was started
