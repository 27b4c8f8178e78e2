"""A teacher with another tokenizer (the text path) on a real local Ray: configs/cross_tokenizer.yaml,
offline SeqKD then online DPKD, tiny models with different vocabularies."""

import dataclasses
import json
import math
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from driver.config import LossConfig, load_config
from driver.online import run_online
from driver.prepare import prepare

pytestmark = [pytest.mark.usefixtures("ray_cluster"), pytest.mark.slow]
CONFIG = Path(__file__).resolve().parents[2] / "configs" / "cross_tokenizer.yaml"


def test_cross_tokenizer_sft_then_dpkd_trains_and_reaches_the_sampler(tmp_path):
    """The config's schedule with a sequence-level pg_rkl phase put between its two: every loss that
    works across tokenizers trains on the text path in one run."""
    from transformers import AutoTokenizer

    cfg = load_config(CONFIG, [f"models.cache_dir={tmp_path / 'cache'}", f"run.runs_dir={tmp_path}"])
    cfg.schedule.insert(1, dataclasses.replace(cfg.schedule[1], steps=2, loss=LossConfig(type="pg_rkl")))
    prep = prepare(cfg, str(tmp_path / "run"))
    assert prep.text_pools == {"default"}
    summary = run_online(cfg, prep, progress=False)

    assert summary["steps"] == 10
    # weights reached the sampler: the policy version went up and its greedy answer changed
    assert summary["policy_version"] >= 3 and summary["sampler_versions"] == [summary["policy_version"]]
    assert summary["probe"]["after"] != summary["probe"]["before"]
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) for r in rows)
    sft, pg, dpkd = ([r for r in rows if r["phase"] == i] for i in range(3))
    assert len(sft) == 2 and len(pg) == 2 and len(dpkd) == 6 and all(r["sft_loss"] is not None for r in sft)
    # pg_rkl on y_s's text: the teacher's sum is its reward, a reverse-KL estimate per student token
    assert all(math.isfinite(r["pg_loss"]) and r["reverse_kl"] > 0 and "reward_margin" not in r for r in pg)
    assert all(math.isfinite(r["dpkd_loss"]) and math.isfinite(r["reward_margin"]) for r in dpkd)
    assert dpkd[0]["loss"] != dpkd[-1]["loss"]  # the loss moved

    s_tok = AutoTokenizer.from_pretrained(prep.student_path)
    t_tok = AutoTokenizer.from_pretrained(prep.teacher_path)
    assert len(s_tok) != len(t_tok)
    # the offline data: the teacher's answers in the student's tokens, its log-prob sums kept
    manifest = json.loads((tmp_path / "run" / "teacher-data" / "manifest.json").read_text())
    assert manifest["teacher_model"]["text_path"] is True
    offline = pq.read_table(tmp_path / "run" / "teacher-data" / "shard-00000.parquet").to_pylist()
    assert offline and all(r["chosen_teacher_logp_sum"] < 0 and r["chosen_teacher_logps"] == [] for r in offline)
    # the buffer's online rows: both sums, no per-token teacher log-probs, each prompt in each tokenizer
    files = sorted((tmp_path / "run" / "checkpoints").rglob("buffer.parquet"))
    online = [r for r in pq.read_table(files[-1]).to_pylist() if r["policy_version"] >= 0]
    assert online
    for r in online:
        assert r["chosen_teacher_logp_sum"] < 0 and r["rejected_teacher_logp_sum"] < 0
        assert r["chosen_teacher_logps"] == r["rejected_teacher_logps"] == [] and r["chosen_topk_ids"] is None
        assert t_tok.decode(r["teacher_prompt_ids"]) == s_tok.decode(r["prompt_ids"])
        assert max(r["chosen_ids"] + r["rejected_ids"]) < len(s_tok)


def test_raykd_generate_writes_a_cross_tokenizer_dataset_in_the_students_tokens(tmp_path, capsys):
    from transformers import AutoTokenizer

    from driver.offline import DatasetError, check_dataset_teacher, generate_dataset, read_dataset
    from kd.data import synthetic_math

    cfg = load_config(CONFIG, [f"models.cache_dir={tmp_path / 'cache'}", "data.num_prompts=6",
                               "data.system_prompt=null"])
    generate_dataset(cfg, tmp_path / "ds", shard_size=4, progress=False)
    assert "raykd: text path: models.teacher (tokenizer vocab 320) and models.student (tokenizer vocab 491)" \
        in capsys.readouterr().err
    prep_student = str(tmp_path / "cache" / "tiny-l2-s1")
    s_tok = AutoTokenizer.from_pretrained(prep_student)
    rows = read_dataset(tmp_path / "ds").to_pylist()
    questions = {r["id"]: r["question"] for r in synthetic_math(6, cfg.run.seed)}
    assert len(rows) == 6
    for r in rows:
        chat = s_tok.apply_chat_template([{"role": "user", "content": questions[r["prompt_id"]]}],
                                         add_generation_prompt=True, tokenize=True, return_dict=False)
        assert r["prompt_ids"] == list(chat) and r["chosen_ids"] and r["chosen_teacher_logp_sum"] < 0
    check_dataset_teacher(str(tmp_path / "ds"), "schedule[0]", "sft", s_tok, 491)
    with pytest.raises(DatasetError, match="written on the text path.*loss.type=fkl needs them; use dpkd or sft"):
        check_dataset_teacher(str(tmp_path / "ds"), "schedule[0]", "fkl", s_tok, 491)
