"""Table-driven bad input: malformed configs and data files each stop `raykd train` with exit code 2
and one line naming the file, row or dotted key, before any actor starts (no run directory)."""

import json
import shutil
from pathlib import Path

import pytest
import yaml

from driver.cli import main
from kd.models import make_tiny_model, tiny_tokenizer
from kd.vocab import tokenizer_fingerprint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(make_tiny_model(tmp_path_factory.mktemp("m") / "tiny", num_layers=2, seed=0))


def data_file(tmp_path, name: str, content: bytes) -> str:
    p = tmp_path / name
    p.write_bytes(content)
    return str(p)


CASES = [
    # (id, config (dict; "{data}" / "{model}" are filled in), data file (name, bytes) or None, expected text)
    ("wrong type", {"learner": {"batch_size": "eight"}}, None, "learner.batch_size='eight': expected an integer"),
    ("zero size", {"buffer": {"capacity": 0}}, None, "buffer.capacity=0: must be a positive integer"),
    ("negative size", {"teacher": {"num_replicas": -1}}, None, "teacher.num_replicas=-1"),
    ("nan", {"learner": {"lr": float("nan")}}, None, "learner.lr=nan: must be a finite number"),
    ("inf", {"loss": {"beta": float("inf")}}, None, "loss.beta=inf: must be a finite number"),
    ("unknown loss", {"loss": {"type": "kl_div"}}, None, "loss.type='kl_div': must be one of"),
    ("unknown priming", {"priming": {"strategy": "flattery"}}, None, "priming.strategy='flattery'"),
    ("unknown key", {"sampler": {"temprature": 0.7}}, None, "sampler.temprature: unknown key"),
    ("renamed key", {"loss": {"lm_coef": 0.5}}, None, "loss.lm_coef: renamed to sft_coef"),
    ("tempered top-k", {"loss": {"type": "jsd", "temperature": 2.0}}, None, "loss.temperature=2.0: must be 1"),
    ("missing data file", {"data": {"source": "/no/such/file.jsonl"}}, None,
     "data.source='/no/such/file.jsonl': file does not exist"),
    ("missing model", {"models": {"teacher": "/no/such/model"}}, None, "model path '/no/such/model' does not exist"),
    ("invalid json", {"data": {"source": "{data}"}}, ("d.jsonl", b'{"question": "ok"}\n{"question": \n'),
     "d.jsonl:2: invalid JSON"),
    ("non-utf8", {"data": {"source": "{data}"}}, ("d.jsonl", b'{"question": "caf\xe9"}\n'), "d.jsonl:1: not valid UTF-8"),
    ("empty prompt", {"data": {"source": "{data}"}}, ("d.jsonl", b'{"question": ""}\n'), "d.jsonl:1: field 'question' is empty"),
    ("missing field", {"data": {"source": "{data}"}}, ("d.jsonl", b'{"q": "x"}\n'), "d.jsonl:1: field 'question' is missing"),
    ("nan answer", {"data": {"source": "{data}"}}, ("d.jsonl", b'{"question": "x", "answer": NaN}\n'),
     "d.jsonl:1: field 'answer' is NaN"),
    ("empty file", {"data": {"source": "{data}"}}, ("d.jsonl", b""), "d.jsonl: no rows (empty dataset)"),
    ("over-long prompts", {"data": {"source": "{data}", "on_overlong": "error", "max_prompt_tokens": 8},
                           "models": {"teacher": "{model}", "student": "{model}"}},
     ("d.jsonl", b'{"question": "a long question with many many words in it"}\n'),
     "data.max_prompt_tokens=8"),
    ("longer than the context", {"data": {"max_prompt_tokens": 1000}, "teacher": {"max_new_tokens": 100},
                                 "models": {"teacher": "{model}", "student": "{model}"}},
     None, "= 1100 > "),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_stops_before_any_actor(tmp_path, capsys, tiny, case):
    _, cfg, data, expect = case
    path = data_file(tmp_path, *data) if data else ""
    text = yaml.safe_dump(cfg).replace("'{data}'", f"'{path}'").replace("'{model}'", f"'{tiny}'")
    text = text.replace("{data}", path).replace("{model}", tiny)
    (tmp_path / "c.yaml").write_text(text)
    code = main(["train", str(tmp_path / "c.yaml"), "--run-dir", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("raykd: error: ") and len(err.splitlines()) == 1, err
    assert expect in err
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------
# Models and offline datasets that do not fit: exact messages. The tiny tokenizer has 491 tokens.
# ---------------------------------------------------------------------------------------------


def _copy_without_weights(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, dst / f.name)
    return dst


@pytest.fixture(scope="module")
def paths(tmp_path_factory, tiny, write_dataset):
    """Broken model directories and offline datasets, by placeholder name."""
    root = tmp_path_factory.mktemp("bad")
    src = Path(tiny)
    noweights = _copy_without_weights(src, root / "noweights")
    truncated = _copy_without_weights(src, root / "truncated")
    data = (src / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    sharded = _copy_without_weights(src, root / "sharded")
    shutil.copy(src / "model.safetensors", sharded / "model-00001-of-00002.safetensors")
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    fp = tokenizer_fingerprint(tiny_tokenizer())
    out = {"model": tiny, "noweights": str(noweights), "truncated": str(truncated), "sharded": str(sharded),
           "small": str(make_tiny_model(root / "small", vocab_size=400)),
           "padded": str(make_tiny_model(root / "padded", vocab_size=640)),
           "len": len(data), "half": len(data) // 2, "fp": fp}
    out["ds_other"] = write_dataset(root / "ds_other", {"spec": "other", "path": "/models/other",
                                                         "tokenizer_fingerprint": "0123456789abcdef",
                                                         "vocab_size": 32000})
    out["ds_padded"] = write_dataset(root / "ds_padded", {"spec": out["padded"], "path": out["padded"],
                                                          "tokenizer_fingerprint": fp, "vocab_size": 640})
    out["ds_old"] = write_dataset(root / "ds_old", None, token_id=600)
    return out


def offline(ds: str, loss: str) -> list:
    return [{"kind": "offline", "steps": 1, "data": "{%s}" % ds, "loss": {"type": loss}}]


EXACT = [
    # (id, command, config (eval: the --model), expected message after "raykd: error: "); "{name}" is
    # filled from `paths`
    ("embedding smaller than tokenizer", "train", {"models": {"teacher": "{model}", "student": "{small}"}},
     "{small}: its embedding has 400 rows (config.json vocab_size) but its tokenizer has 491 tokens; "
     "the embedding must cover every token id"),
    ("padded vocab, token-level loss", "train",
     {"models": {"teacher": "{padded}", "student": "{model}"}, "loss": {"type": "fkl"}},
     "models.teacher ({padded}) has vocab_size 640 but models.student ({model}) has 491: loss.type=fkl "
     "compares distributions over the vocabulary and needs equal sizes; with these models use dpkd, sft, pg_rkl"),
    ("padded vocab, token-level loss in a later phase", "train",
     {"models": {"teacher": "{padded}", "student": "{model}"},
      "schedule": [{"kind": "online", "steps": 1}, {"kind": "online", "steps": 1, "loss": {"type": "jsd"}}]},
     "models.teacher ({padded}) has vocab_size 640 but models.student ({model}) has 491: "
     "schedule[1].loss.type=jsd compares distributions over the vocabulary and needs equal sizes; with these "
     "models use dpkd, sft, pg_rkl"),
    ("dataset from another tokenizer", "train",
     {"models": {"teacher": "{model}", "student": "{model}"}, "schedule": offline("ds_other", "sft")},
     "schedule[0].data={ds_other}: generated with teacher /models/other (tokenizer 0123456789abcdef, "
     "vocab_size 32000), but this run's student has tokenizer {fp}, vocab_size 491; regenerate it with "
     "raykd generate and this run's models"),
    ("dataset from a padded teacher, token-level loss", "train",
     {"models": {"teacher": "{model}", "student": "{model}"}, "schedule": offline("ds_padded", "fkl")},
     "schedule[0].data={ds_padded}: generated with teacher {padded} (tokenizer {fp}, vocab_size 640), but "
     "this run's student has vocab_size 491; schedule[0].loss.type=fkl compares distributions over the "
     "vocabulary and needs equal sizes (use sft, or regenerate with a teacher of equal vocab_size)"),
    ("unstamped dataset with ids past the student", "train",
     {"models": {"teacher": "{model}", "student": "{model}"}, "schedule": offline("ds_old", "sft")},
     "schedule[0].data={ds_old}: chosen_ids holds token id 600, past this run's student's vocab_size 491: "
     "it was generated with another tokenizer; regenerate it with raykd generate and this run's models"),
    ("config.json but no weights", "train", {"models": {"teacher": "{model}", "student": "{noweights}"}},
     "{noweights}: no weight files (*.safetensors or pytorch_model*.bin), only config.json; copy the "
     "model's weights too"),
    ("truncated safetensors", "train", {"models": {"teacher": "{truncated}", "student": "{model}"}},
     "{truncated}/model.safetensors: truncated safetensors file ({half} bytes; its header needs {len})"),
    ("missing shard", "train", {"models": {"teacher": "{model}", "student": "{sharded}"}},
     "{sharded}/model.safetensors.index.json: 1 of 2 listed shard(s) missing (model-00002-of-00002.safetensors)"),
    ("generate: no weights", "generate", {"models": {"teacher": "{noweights}", "student": "{model}"}},
     "{noweights}: no weight files (*.safetensors or pytorch_model*.bin), only config.json; copy the "
     "model's weights too"),
    # the schedule's dataset is what `raykd generate` writes: it gets past the config to the model check
    ("generate: schedule dataset not there yet", "generate",
     {"models": {"teacher": "{noweights}", "student": "{model}"},
      "schedule": [{"kind": "offline", "steps": 1, "data": "{model}/not-yet", "loss": {"type": "sft"}}]},
     "{noweights}: no weight files (*.safetensors or pytorch_model*.bin), only config.json; copy the "
     "model's weights too"),
    ("eval: no weights", "eval", "{noweights}",
     "{noweights}: no weight files (*.safetensors or pytorch_model*.bin), only config.json; copy the "
     "model's weights too"),
    ("eval: truncated safetensors", "eval", "{truncated}",
     "{truncated}/model.safetensors: truncated safetensors file ({half} bytes; its header needs {len})"),
]


def _argv(command: str, cfg, tmp_path, p) -> list[str]:
    if command == "eval":
        return ["eval", "--model", cfg.format(**p), "--data", "synthetic_math", "--no-progress"]
    text = yaml.safe_dump(cfg)
    for k, v in p.items():
        text = text.replace("{%s}" % k, str(v))
    (tmp_path / "c.yaml").write_text(text)
    extra = ["--out", str(tmp_path / "run")] if command == "generate" else ["--run-dir", str(tmp_path / "run")]
    return [command, str(tmp_path / "c.yaml"), *extra, "--no-progress"]


@pytest.mark.parametrize("case", EXACT, ids=[c[0] for c in EXACT])
def test_models_and_datasets_that_do_not_fit(tmp_path, capsys, paths, case):
    name, command, cfg, expect = case
    code = main(_argv(command, cfg, tmp_path, paths))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1] == "raykd: error: " + expect.format(**paths)
    assert not [line for line in err[:-1] if line.startswith("raykd: error")]
    assert not (tmp_path / "run").exists()


def test_debug_shows_the_traceback(tmp_path, capsys, paths):
    argv = _argv("train", {"models": {"teacher": "{noweights}", "student": "{model}"}}, tmp_path, paths)
    assert main(["--debug", *argv]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "kd.models.ModelSpecError" in err
    assert err.strip().splitlines()[-1].startswith("raykd: error: ")
    assert main([*argv, "--debug"]) == 2 and "Traceback" in capsys.readouterr().err
    assert main(argv) == 2 and "Traceback" not in capsys.readouterr().err


def test_trust_remote_code_is_off_unless_set(monkeypatch):
    from driver.config import load_config
    from kd.models import TRUST_REMOTE_CODE_ENV, hf_kwargs

    monkeypatch.delenv(TRUST_REMOTE_CODE_ENV, raising=False)
    assert hf_kwargs() == {"trust_remote_code": False}
    assert load_config(None).models.trust_remote_code is False
    monkeypatch.setenv(TRUST_REMOTE_CODE_ENV, "1")
    assert hf_kwargs() == {"trust_remote_code": True}
