"""The README's offline -> online flow, command by command, as written there: only `--set` overrides
that shrink it to tiny models are appended, so a change to the README's commands is tested as is."""

import json
import os
import re
import shlex
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow  # starts a local Ray cluster per command


def readme_commands(section: str) -> list[list[str]]:
    """The `raykd ...` lines of the first code block under the README heading ``section``."""
    text = (REPO / "README.md").read_text()
    body = text.split(f"## {section}\n", 1)[1]
    block = re.search(r"```\n(.*?)```", body, re.S).group(1)
    lines = [line.split(" #", 1)[0].strip() for line in block.splitlines()]
    return [shlex.split(line) for line in lines if line.startswith("raykd ")]


def test_offline_then_online_as_the_readme_says(tmp_path, tiny_models):
    commands = readme_commands("Offline → online")
    assert [c[:2] for c in commands] == [["raykd", "generate"], ["raykd", "train"]]
    shrink = [f"models.teacher={tiny_models['teacher']}", f"models.student={tiny_models['student']}",
              "data.num_prompts=16", "teacher.max_new_tokens=6", "sampler.max_new_tokens=6",
              "teacher.engine.backend=hf", "sampler.engine.backend=hf", "ray.num_cpus=4",
              # the tiny 491-token BPE spends ~1.3x SmolLM2's tokens on a prompt (135-173 vs <128)
              "data.max_prompt_tokens=256"]
    (tmp_path / "configs").symlink_to(REPO / "configs")  # the README's paths are relative to the repo
    # this worktree's code, not whatever raykd the environment has installed; a fresh local cluster
    env = dict(os.environ, PYTHONPATH=str(REPO), RAY_ADDRESS="", TOKENIZERS_PARALLELISM="false")
    outputs = []
    for cmd in commands:
        argv = [sys.executable, "-m", "driver.cli", *cmd[1:], "--no-progress"]
        argv += [arg for s in shrink for arg in ("--set", s)]
        proc = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"{shlex.join(cmd)}\n{proc.stderr[-3000:]}"
        outputs.append(proc)

    data = tmp_path / "runs" / "quickstart-teacher-data"
    stamp = json.loads((data / "manifest.json").read_text())["teacher_model"]
    assert stamp["path"] == tiny_models["teacher"] and stamp["vocab_size"] == 491
    (run,) = [p for p in (tmp_path / "runs").iterdir() if p.name.startswith("offline-seqkd-")]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 32 and summary["skipped_overlong"] == 0
    assert "over-long prompts" not in outputs[1].stdout  # said only when some were skipped
    # the online phase cycles through the prompts: every one taken reached the buffer, none twice as often
    consumed = [i for line in (run / "consumed.jsonl").read_text().splitlines()
                for i in json.loads(line)["prompt_ids"]]
    counts = Counter(consumed)
    assert len(consumed) == summary["prompts_requested"] > 0 and max(counts.values()) - min(counts.values()) <= 1
    # the online phase's y_t are the generated dataset's answers (teacher_answers: offline): no teacher generation
    (teacher,) = summary["teachers"]
    assert teacher["reused_answers"] == len(consumed) and teacher["generated_tokens"] == 0
