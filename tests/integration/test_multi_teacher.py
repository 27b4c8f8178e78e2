"""Several teacher pools in one run (``teachers:`` + ``route:``), on tiny models and a real local Ray."""

import json

import pyarrow.parquet as pq
import pytest
import yaml

from driver.config import load_config
from driver.online import run_online
from driver.prepare import prepare

pytestmark = [pytest.mark.usefixtures("ray_cluster"), pytest.mark.slow]


def test_two_teachers_route_every_prompt_by_its_task_field(tiny_models, tmp_path):
    tasks = ["math", "code"] * 6
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"id": f"q{i}", "question": f"What is {i} plus {i}?",
                                        "answer": str(2 * i), "task": t}) + "\n" for i, t in enumerate(tasks)))
    engine = {"backend": "hf"}
    cfg_file = tmp_path / "two_teachers.yaml"
    cfg_file.write_text(yaml.safe_dump({
        "run": {"runs_dir": str(tmp_path)},
        "models": {"teacher": tiny_models["teacher"], "student": tiny_models["student"],
                   "cache_dir": str(tmp_path / "cache")},
        "data": {"source": str(data)},
        "teachers": [
            {"name": "math", "model": tiny_models["teacher"], "max_new_tokens": 6, "top_k_logprobs": 4,
             "engine": engine},
            {"name": "code", "model": tiny_models["student_b"], "max_new_tokens": 6, "top_k_logprobs": 4,
             "engine": engine},
        ],
        "route": {"field": "task"},
        "sampler": {"max_new_tokens": 6, "prompts_per_request": 4, "engine": engine},
        "buffer": {"capacity": 64, "min_size_to_train": 4},
        "learner": {"batch_size": 4, "max_steps": 4, "lr": 5e-3},
        "sync": {"every_steps": 2},
        "ray": {"num_cpus": 6},
    }))
    cfg = load_config(cfg_file)
    prep = prepare(cfg, str(tmp_path / "run"))
    summary = run_online(cfg, prep, progress=False)

    assert summary["steps"] == 4
    # the buffer saved with the final checkpoint: every row was made by its prompt's task's teacher
    task_of = {f"q{i}": t for i, t in enumerate(tasks)}
    files = sorted((tmp_path / "run" / "checkpoints").rglob("*.parquet"))
    assert files, "no buffer file in the checkpoint"
    rows = pq.read_table(files[-1]).select(["prompt_id", "teacher_name"]).to_pylist()
    assert rows and all(r["teacher_name"] == task_of[r["prompt_id"]] for r in rows)
    # each teacher's replica made pairs, and the summary counts them per teacher
    by_name = {t["name"]: t["pairs"] for t in summary["teachers"]}
    assert set(by_name) == {"math", "code"} and all(n > 0 for n in by_name.values())
    assert summary["pairs_by_teacher"] == by_name
    assert sum(by_name.values()) == summary["pairs_added"]
    assert sum(summary["buffer"]["size_by_teacher"].values()) == summary["buffer"]["size"]
