"""Runs that cannot be lost, on a real cluster: an interrupted run resumes with the command it
printed (past a damaged checkpoint), and a learner that dies before the first checkpoint restarts the
run from step 0. The cases decided before any actor starts are in tests/unit/test_runs.py."""

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest
import yaml

from driver.cli import main
from driver.config import load_config
from driver.online import run_online
from driver.prepare import prepare
from driver.runs import commit_resume, plan_resume
from test_faults import kill_after  # the same actor-killing thread as the fault tests

HF = ["teacher.engine.backend=hf", "sampler.engine.backend=hf"]  # fast engines for tiny models
pytestmark = pytest.mark.slow


def snapshot(run) -> dict:
    return {p.relative_to(run).as_posix(): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def steps_logged(run) -> list[int]:
    return [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]


def consumed_twice(run) -> int:
    lines = (run / "consumed.jsonl").read_text().splitlines()
    seen = Counter((x["epoch"], pid) for x in map(json.loads, lines) for pid in x["prompt_ids"])
    return max(seen.values()) - 1


def test_an_interrupted_run_resumes_with_the_printed_command(tiny_models, tmp_path, capsys):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({  # max_steps 2 here: the run's --set says 8 (the user's issue)
        "models": {"teacher": tiny_models["teacher"], "student": tiny_models["student"]},
        "data": {"num_prompts": 40}, "teacher": {"max_new_tokens": 6, "top_k_logprobs": 2, "engine": {"backend": "hf"}},
        "sampler": {"max_new_tokens": 6, "prompts_per_request": 4, "engine": {"backend": "hf"}},
        "buffer": {"capacity": 64}, "learner": {"batch_size": 4, "max_steps": 2}, "ray": {"num_cpus": 4}}))
    run = tmp_path / "run"
    env = dict(os.environ, RAY_ADDRESS="")  # its own cluster
    raykd = [sys.executable, "-m", "driver.cli"]
    proc = subprocess.Popen([*raykd, "train", str(cfg), "--set", "learner.max_steps=8", "--set",
                             "checkpoint.every_steps=2", "--run-dir", str(run), "--no-progress"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and not ((run / "metrics.jsonl").exists() and len(steps_logged(run)) >= 3):
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 130, err[-2000:]
    stopped = len(steps_logged(run))
    ckpt = run / "checkpoints" / f"step-{stopped:06d}"
    assert err.strip().splitlines()[-1] == (f"raykd: stopped at step {stopped}, checkpoint {ckpt}; "
                                            f"continue with: raykd train --resume {run}")
    printed = shlex.split(err.strip().splitlines()[-1].split("continue with: ")[1])
    saved = snapshot(run)

    # the YAML without the run's --set overrides: refused, nothing written (it used to end the run)
    assert main(["train", str(cfg), "--resume", str(run)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"raykd: error: --resume {run}: the config ends at step 2, before the checkpoint {ckpt.name}; a resume "
        "never goes back (checkpoint.every_steps: 2 -> 0, learner.max_steps: 8 -> 2)")
    assert snapshot(run) == saved

    # the newest checkpoint is damaged: the printed command resumes from the one before
    (ckpt / "buffer.parquet").write_bytes((ckpt / "buffer.parquet").read_bytes()[:50])
    done = subprocess.run([*raykd, *printed[1:]], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert re.search(rf"raykd: warning: checkpoint {ckpt.name} is damaged \(buffer.parquet has 50 bytes, "
                     rf"expected \d+\); kept as damaged-{ckpt.name}; using step-\d+", done.stderr)
    assert steps_logged(run) == list(range(1, 9)) and consumed_twice(run) == 0
    assert (run / "config.yaml").read_bytes() == saved["config.yaml"]
    assert (run / "checkpoints" / f"damaged-{ckpt.name}").is_dir()
    assert json.loads((run / "summary.json").read_text())["steps"] == 8

    # and once more: the run is complete, nothing is written
    finished = snapshot(run)
    assert main(printed[1:]) == 0
    assert capsys.readouterr().err.strip() == (
        f"raykd: {run} is complete (step-000008 is the final step 8); nothing to do")
    assert snapshot(run) == finished


@pytest.mark.usefixtures("ray_cluster")
def test_a_learner_dying_before_the_first_checkpoint_restarts_from_step_0(tiny_models, tmp_path):
    cfg = load_config(None, [
        f"models.teacher={tiny_models['teacher']}", f"models.student={tiny_models['student']}",
        "data.num_prompts=200", "teacher.max_new_tokens=6", "sampler.max_new_tokens=6",
        "teacher.top_k_logprobs=2", "sampler.prompts_per_request=2", "buffer.capacity=16",
        "learner.batch_size=4", "learner.lr=5e-3", "sync.every_steps=2", "ray.num_cpus=6", *HF,
        "learner.max_steps=6", "checkpoint.every_steps=0", "learner.max_restarts=1"])
    run = tmp_path / "run"
    killer = kill_after(run, "learner-0", steps=3)
    summary = run_online(cfg, prepare(cfg, str(run)), progress=False)
    killer.join(timeout=1)
    assert summary["steps"] == 6 and summary["learner_restarts"] == 1
    assert steps_logged(run) == list(range(1, 7)) and consumed_twice(run) == 0  # rewound to 0, redone once
    assert summary["sampler_versions"] == [summary["policy_version"]]

    # a resume that extends the finished run keeps the fault counters (totals over the whole run)
    plan = plan_resume(run, None, ["learner.max_steps=8"], allow_change=True)
    again = run_online(plan.cfg, prepare(plan.cfg, str(run), resume=True), progress=False,
                       resume=plan.checkpoint, on_resumed=lambda: commit_resume(plan))
    assert [json.loads(x)["key"] for x in (run / "config_changes.jsonl").read_text().splitlines()] == [
        "learner.max_steps"]
    assert consumed_twice(run) == 0  # the extended phase goes on from where its prompts stopped
    assert again["steps"] == 8 and again["learner_restarts"] == 1
    assert steps_logged(run) == list(range(1, 9))
    assert again["buffer"]["size"] <= 16  # drained over capacity before checkpoints, evicted after
