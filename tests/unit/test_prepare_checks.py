"""What `prepare` allows, says and writes before Ray starts (the refusals are in test_bad_input.py)."""

import json
import os
import shutil

import pytest

from driver.config import load_config
from driver.monitoring import format_summary
from driver.prepare import prepare, prepare_models
from kd.models import make_tiny_model, truncated_student_dir


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("m")
    return {"tiny": str(make_tiny_model(root / "tiny", num_layers=2)),
            "padded": str(make_tiny_model(root / "padded", num_layers=2, vocab_size=640))}


@pytest.mark.parametrize("loss", ["dpkd", "sft", "pg_rkl"])
def test_padded_teacher_is_fine_for_sequence_level_losses(models, loss):
    """Qwen2.5-7B (152064) and -0.5B (151936) share a tokenizer; DPKD between them is fine."""
    cfg = load_config(None, [f"models.teacher={models['padded']}", f"models.student={models['tiny']}",
                             f"loss.type={loss}"])
    assert prepare_models(cfg) == (models["padded"], models["tiny"])


def test_skipped_prompts_are_said_on_screen(tmp_path, capsys, models):
    data = tmp_path / "d.jsonl"
    rows = [{"question": "2 + 2?"}, {"question": " ".join(["many words"] * 40)}, {"question": "3 + 4?"}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(None, [f"models.teacher={models['tiny']}", f"models.student={models['tiny']}",
                             f"data.source={data}", "data.max_prompt_tokens=48", "data.system_prompt=null"])
    prep = prepare(cfg, str(tmp_path / "run"))
    assert prep.skipped_overlong == 1 and len(prep.requests) == 2
    assert capsys.readouterr().err.strip() == ("raykd: skipped 1 of 3 prompts longer than "
                                               "data.max_prompt_tokens=48 (data.on_overlong=skip)")


def test_terminal_summary_shows_skipped_prompts():
    assert "skipped      3 over-long prompts (data.on_overlong=skip)" in format_summary(
        {"steps": 2, "wall_s": 1.0, "skipped_overlong": 3}).splitlines()


def test_truncated_student_goes_under_the_cache_not_next_to_the_teacher(tmp_path, models):
    teachers = tmp_path / "teachers"
    teacher = teachers / "t"
    shutil.copytree(models["tiny"], teacher)
    before = sorted(p.name for p in teachers.iterdir())
    cache = tmp_path / "cache"
    cfg = load_config(None, [f"models.teacher={teacher}", "models.student_keep_layers=[1]",
                             f"models.cache_dir={cache}"])
    _, student = prepare_models(cfg)
    assert sorted(p.name for p in teachers.iterdir()) == before  # nothing written next to the teacher
    assert os.path.commonpath([student, cache]) == str(cache)
    assert json.loads((cache / "students" / os.path.basename(student) / "config.json").read_text())[
        "num_hidden_layers"] == 1
    # another teacher of the same name, other layers, or a changed teacher: never the same student
    other = tmp_path / "elsewhere" / "t"
    shutil.copytree(models["tiny"], other)
    assert truncated_student_dir(other, [1], cache) != truncated_student_dir(teacher, [1], cache)
    assert truncated_student_dir(teacher, [0], cache) != truncated_student_dir(teacher, [1], cache)
    st = (teacher / "model.safetensors").stat()
    os.utime(teacher / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert str(truncated_student_dir(teacher, [1], cache)) != student


def test_unstamped_dataset_warns_and_passes_when_its_ids_fit(tmp_path, capsys, write_dataset):
    from driver.offline import check_dataset_teacher
    from kd.models import tiny_tokenizer

    ds = write_dataset(tmp_path / "old", None, token_id=7)
    check_dataset_teacher(ds, "schedule[0]", "fkl", tiny_tokenizer(), 491)
    assert capsys.readouterr().err.startswith(f"raykd: warning: schedule[0].data={ds}: manifest.json has no "
                                              "teacher stamp")


def test_resuming_a_dataset_with_another_teacher_behind_the_same_spec_is_refused(tmp_path):
    from driver.offline import MANIFEST, DatasetError, _check_manifest

    stamp = {"spec": "t", "path": "/m/t", "tokenizer_fingerprint": "aaaa", "vocab_size": 491}
    (tmp_path / MANIFEST).write_text(json.dumps({"identity": {"teacher": "t"}, "teacher_model": stamp}))
    _check_manifest(tmp_path, {"teacher": "t"}, stamp)  # same teacher: resumes
    with pytest.raises(DatasetError, match=r"vocab_size: 491 -> 640"):
        _check_manifest(tmp_path, {"teacher": "t"}, {**stamp, "vocab_size": 640})


def test_trimmed_bpe_is_the_bpe_trained_to_that_size():
    """BPE training is greedy, so the tokenizer trained to 400 tokens is the first 400 of the one
    trained to 512 on the same text: trimming must give exactly it (ids and splits)."""
    from kd.models import tiny_tokenizer, trim_bpe_vocabulary

    trimmed, trained = trim_bpe_vocabulary(tiny_tokenizer(512), 400), tiny_tokenizer(400)
    assert trimmed.get_vocab() == trained.get_vocab()
    for text in ("Tom has 3 apples and buys 5 more.", "Zebras jumped over 1234 lazy dogs; answer: 42 ü"):
        assert trimmed.encode(text) == trained.encode(text)
        assert trimmed.decode(trimmed.encode(text)) == text
    assert trimmed.apply_chat_template([{"role": "user", "content": "2 + 2?"}], tokenize=False) == \
        "<|im_start|>user\n2 + 2?<|im_end|>\n"


def test_student_vocab_size_gives_a_smaller_student_with_the_teachers_first_rows(tmp_path, models):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    cfg = load_config(None, [f"models.teacher={models['tiny']}", "models.student_keep_layers=[1]",
                             "models.student_vocab_size=400", f"models.cache_dir={tmp_path}"])
    text_pools: set = set()
    _, student = prepare_models(cfg, text_pools)
    assert text_pools == {"default"}  # another tokenizer: the run takes the text path
    assert json.loads((tmp_path / "students" / os.path.basename(student) / "config.json").read_text())[
        "vocab_size"] == 400
    assert len(AutoTokenizer.from_pretrained(student)) == 400
    t, s = load_file(f"{models['tiny']}/model.safetensors"), load_file(f"{student}/model.safetensors")
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        if key in t:
            assert s[key].shape[0] == 400 and torch.equal(s[key], t[key][:400]), key
    with pytest.raises(Exception, match="use different tokenizers"):  # a caller without the text path
        prepare_models(cfg)


@pytest.mark.parametrize("size, expect", [
    (100, "models.student_vocab_size=100: must be between the special tokens and byte alphabet (259 ids)"),
    (491, "and the teacher's vocabulary (491)"),
])
def test_bad_student_vocab_size(tmp_path, models, size, expect):
    cfg = load_config(None, [f"models.teacher={models['tiny']}", "models.student_keep_layers=[1]",
                             f"models.student_vocab_size={size}", f"models.cache_dir={tmp_path}"])
    with pytest.raises(Exception) as e:
        prepare_models(cfg, set())
    assert expect in str(e.value)
