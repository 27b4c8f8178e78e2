"""Several teacher pools in one run (``teachers:`` + ``route:``), on tiny models and a real local Ray."""

import json

import pyarrow.parquet as pq
import pytest
import yaml

from driver.config import load_config
from driver.online import run_online
from driver.prepare import prepare
from driver.runs import commit_resume, plan_resume

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
        "learner": {"batch_size": 4, "max_steps": 2, "lr": 5e-3},
        "sync": {"every_steps": 2},
        "checkpoint": {"every_steps": 2},
        "ray": {"num_cpus": 6},
    }))
    cfg = load_config(cfg_file)
    run = tmp_path / "run"
    first = run_online(cfg, prepare(cfg, str(run)), progress=False)
    assert first["steps"] == 2
    # resumed for 2 more steps: the per-teacher counts carry over from the checkpoint
    plan = plan_resume(run, None, ["learner.max_steps=4"], allow_change=True)
    summary = run_online(plan.cfg, prepare(plan.cfg, str(run), resume=True), progress=False,
                         resume=plan.checkpoint, on_resumed=lambda: commit_resume(plan))

    assert summary["steps"] == 4
    # the buffer saved with the final checkpoint: every row was made by its prompt's task's teacher
    task_of = {f"q{i}": t for i, t in enumerate(tasks)}
    files = sorted((tmp_path / "run" / "checkpoints").rglob("*.parquet"))
    assert files, "no buffer file in the checkpoint"
    rows = pq.read_table(files[-1]).select(["prompt_id", "teacher_name"]).to_pylist()
    assert rows and all(r["teacher_name"] == task_of[r["prompt_id"]] for r in rows)
    # the summary's rows per teacher, over both sessions, are the consumed prompts counted by their task
    consumed = [pid for line in (run / "consumed.jsonl").read_text().splitlines()
                for pid in json.loads(line)["prompt_ids"]]
    expected = {t: sum(task_of[pid] == t for pid in consumed) for t in ("math", "code")}
    assert all(n > 0 for n in expected.values())
    assert summary["pairs_by_teacher"] == expected
    assert sum(expected.values()) == summary["pairs_added"]
    # each pool's replica made pairs in this session too; those alone leave out the first session's
    this_session = {t["name"]: t["pairs"] for t in summary["teachers"]}
    assert all(0 < this_session[t] <= expected[t] for t in expected)
    assert sum(this_session.values()) < summary["pairs_added"]
    assert sum(summary["buffer"]["size_by_teacher"].values()) == summary["buffer"]["size"]
    # the learner's metrics by teacher pool, on the steps whose batch mixed both (absent on the others)
    steps = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    mixed = [m for m in steps if any(k.startswith("rows/") for k in m)]
    assert mixed, "no step's batch held rows of both teachers"
    for m in mixed:
        assert {k for k in m if k.startswith("rows/")} == {"rows/math", "rows/code"}
        assert m["rows/math"] >= 1 and m["rows/code"] >= 1 and m["rows/math"] + m["rows/code"] == 4
        for t in ("math", "code"):
            assert {f"reward_margin/{t}", f"sft_loss/{t}", f"y_t_len/{t}", f"y_s_len/{t}"} <= set(m)
            assert 0 <= m[f"reward_accuracy/{t}"] <= 1 and 1 <= m[f"y_t_len/{t}"] <= 6
    for m in steps:
        if m not in mixed:
            assert not any("/" in k for k in m)
