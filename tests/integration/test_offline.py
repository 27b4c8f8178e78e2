"""Offline teacher datasets: generate (sharded, atomic, resumable) -> train offline -> online."""

import json
import os
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
import yaml

from driver.config import load_config
from driver.offline import DatasetError, generate_dataset, read_dataset, shard_name

HF = ["teacher.engine.backend=hf", "sampler.engine.backend=hf"]  # fast engines for tiny models
pytestmark = [pytest.mark.usefixtures("ray_cluster"), pytest.mark.slow]


def gen_config(tiny_models, tmp_path, *overrides):
    return load_config(None, [
        f"models.teacher={tiny_models['teacher']}", f"models.student={tiny_models['student']}",
        "data.num_prompts=10", "teacher.max_new_tokens=6", "teacher.top_k_logprobs=4",
        "sampler.prompts_per_request=2", "ray.num_cpus=6", *HF, *overrides])


def test_generate_writes_complete_shards_and_resumes(tiny_models, tmp_path):
    cfg = gen_config(tiny_models, tmp_path)
    out = tmp_path / "ds"
    s = generate_dataset(cfg, out, shard_size=4, progress=False)
    assert (s["shards"], s["written"], s["prompts"]) == (3, 3, 10)
    table = read_dataset(out)
    assert table.num_rows == 10 and len(set(table.column("prompt_id").to_pylist())) == 10
    assert set(table.column("policy_version").to_pylist()) == {-1}
    assert all(r == [] for r in table.column("rejected_ids").to_pylist())
    row = table.slice(0, 1).to_pylist()[0]
    assert len(row["chosen_teacher_logps"]) == len(row["chosen_ids"]) == len(row["chosen_topk_ids"]) > 0
    assert row["priming"] == "none"

    # a lost shard plus a half-written temporary: a re-run redoes only that shard
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*")}
    (out / shard_name(1)).unlink()
    (out / f".{shard_name(1)}.tmp").write_bytes(b"half a shard")
    s2 = generate_dataset(cfg, out, shard_size=4, progress=False)
    assert s2["written"] == 1
    assert (out / shard_name(0)).stat().st_mtime_ns == mtimes[shard_name(0)]
    assert not list(out.glob(".*.tmp"))
    assert read_dataset(out).num_rows == 10

    with pytest.raises(DatasetError, match="generated with other settings"):
        generate_dataset(gen_config(tiny_models, tmp_path, "priming.strategy=teacher"), out, 4, progress=False)


def test_generate_resumes_after_a_kill(tiny_models, tmp_path):
    """Kill `raykd generate` once a shard is on disk; the re-run completes the dataset exactly."""
    cfg_path = tmp_path / "gen.yaml"
    cfg_path.write_text(yaml.safe_dump({
        "models": {"teacher": tiny_models["teacher"], "student": tiny_models["student"]},
        "data": {"num_prompts": 80},  # 40 shards: the kill lands while they are being written
        "teacher": {"max_new_tokens": 8, "top_k_logprobs": 2, "engine": {"backend": "hf"}},
        "sampler": {"prompts_per_request": 2}, "ray": {"num_cpus": 2}}))
    out = tmp_path / "ds"
    cmd = [sys.executable, "-m", "driver.cli", "generate", str(cfg_path), "--out", str(out),
           "--shard-size", "2", "--no-progress"]
    env = dict(os.environ, RAY_ADDRESS="")  # its own local cluster, not the test session's
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list(out.glob("shard-*.parquet")):
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    first = sorted(p.name for p in out.glob("shard-*.parquet"))
    assert 1 <= len(first) < 40, "the kill should land while shards are still being written"
    for p in out.glob("shard-*.parquet"):
        pq.read_table(p)  # every shard under a final name is complete
    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert json.loads(rerun.stdout)["written"] == 40 - len(first)
    table = read_dataset(out)
    assert table.num_rows == 80 and len(set(table.column("prompt_id").to_pylist())) == 80


def test_offline_then_online_schedule(tiny_models, tmp_path):
    from driver.online import run_online
    from driver.prepare import prepare

    ds = tmp_path / "ds"
    generate_dataset(gen_config(tiny_models, tmp_path), ds, shard_size=4, progress=False)
    cfg = load_config(None, [
        f"models.teacher={tiny_models['teacher']}", f"models.student={tiny_models['student']}",
        "data.num_prompts=16", "teacher.max_new_tokens=6", "sampler.max_new_tokens=6",
        "teacher.top_k_logprobs=4", "sampler.prompts_per_request=4", "buffer.capacity=32",
        "learner.batch_size=4", "learner.lr=5e-3", "sync.every_steps=2", "ray.num_cpus=6", *HF,
        f"schedule=[{{kind: offline, steps: 3, data: '{ds}', loss: {{type: sft}}, lr: 1.0e-2}}, "
        "{kind: online, steps: 2, loss: {type: dpkd}}]"])
    # the dataset's answers stand in for the teacher's only for prompts primed as this run primes them
    primed = gen_config(tiny_models, tmp_path, "priming.strategy=teacher",
                        f"schedule=[{{kind: online, steps: 1, teacher_answers: '{ds}', loss: {{type: dpkd}}}}]")
    with pytest.raises(DatasetError, match=r"schedule\[0\].teacher_answers=.*: generated with other priming "
                                           r"settings \(priming priming: 'none', this run 'teacher'"):
        prepare(primed, str(tmp_path / "primed"))
    prep = prepare(cfg, str(tmp_path / "run"))
    summary = run_online(cfg, prep, progress=False)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["phase_kind"]) for r in rows] == [
        (1, "offline"), (2, "offline"), (3, "offline"), (4, "online"), (5, "online")]
    assert all("dpkd_loss" not in r and r["sft_loss"] is not None for r in rows[:3])  # SeqKD on teacher text
    assert all("dpkd_loss" in r for r in rows[3:])
    # offline_torch_threads 'auto' (the default): the one rank takes every CPU of its node, since the
    # engines idle; back to learner.torch_threads online
    cpus = len(os.sched_getaffinity(0))
    assert [r["learner_threads"] for r in rows] == [cpus] * 3 + [1, 1]
    assert [r["lr"] for r in rows] == pytest.approx([1e-2] * 3 + [5e-3] * 2)  # the phase's own, then learner.lr
    assert summary["steps"] == 5 and summary["sampler_versions"] == [summary["policy_version"]]


def test_offline_phase_without_data_uses_the_runs_own_teacher_data(tiny_models, tmp_path):
    """No `raykd generate` first: the run generates its offline data with its own teacher pool, then
    the online phase samples from the student the offline phase trained (weights pushed at its end)."""
    import pyarrow.parquet as pq

    from driver.online import latest_checkpoint, run_online
    from driver.prepare import prepare

    cfg = load_config(None, [
        f"models.teacher={tiny_models['teacher']}", f"models.student={tiny_models['student']}",
        "data.num_prompts=12", "teacher.max_new_tokens=6", "sampler.max_new_tokens=6",
        "teacher.top_k_logprobs=4", "sampler.prompts_per_request=4", "buffer.capacity=32",
        "learner.batch_size=4", "learner.lr=5e-3", "sync.every_steps=2", "ray.num_cpus=6", *HF,
        "eval.before_after=true", "eval.teacher=true", "eval.limit=3", "eval.max_new_tokens=4",
        "schedule=[{kind: offline, steps: 2, loss: {type: sft}},"
        " {kind: online, steps: 2, loss: {type: dpkd}, teacher_answers: offline}]"])
    run = tmp_path / "run"
    summary = run_online(cfg, prepare(cfg, str(run)), progress=False)
    data = read_dataset(run / "teacher-data")
    assert data.num_rows == 12 and set(data.column("policy_version").to_pylist()) == {-1}
    assert summary["steps"] == 4
    # teacher_answers: offline: the teacher answered each prompt once, for the offline data; online it
    # only scored the student's samples, and the pairs' y_t are the stored answers of their prompts
    generated = sum(map(len, data.column("chosen_ids").to_pylist()))
    (teacher,) = summary["teachers"]
    assert teacher["generated_tokens"] == generated
    online_prompts = sum(len(json.loads(x)["prompt_ids"]) for x in (run / "consumed.jsonl").read_text().splitlines())
    assert teacher["reused_answers"] == online_prompts > 0
    stored = dict(zip(data.column("prompt_id").to_pylist(), data.column("chosen_ids").to_pylist()))
    # one push at the end of the offline phase, one at online step 4: the samplers run version 2
    assert summary["policy_version"] == 2 and summary["sampler_versions"] == [2]
    online_rows = pq.read_table(latest_checkpoint(run) / "buffer.parquet")  # cleared at the phase change
    assert online_rows.num_rows > 0 and min(online_rows.column("policy_version").to_pylist()) >= 1
    for pid, y_t in zip(online_rows.column("prompt_id").to_pylist(), online_rows.column("chosen_ids").to_pylist()):
        assert y_t == stored[pid]
    for key in ("eval_before", "eval_after", "eval_teacher"):
        assert set(summary[key]) >= {"exact_match", "rouge_l", "answer_rate"}, key
    assert summary["eval_after"]["rouge_l"] is not None
