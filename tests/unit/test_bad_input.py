"""Table-driven bad input: malformed configs and data files each stop `raykd train` with exit code 2
and one line naming the file, row or dotted key, before any actor starts (no run directory)."""

import pytest
import yaml

from driver.cli import main
from kd.models import make_tiny_model


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


def test_trust_remote_code_is_off_unless_set(monkeypatch):
    from driver.config import load_config
    from kd.models import TRUST_REMOTE_CODE_ENV, hf_kwargs

    monkeypatch.delenv(TRUST_REMOTE_CODE_ENV, raising=False)
    assert hf_kwargs() == {"trust_remote_code": False}
    assert load_config(None).models.trust_remote_code is False
    monkeypatch.setenv(TRUST_REMOTE_CODE_ENV, "1")
    assert hf_kwargs() == {"trust_remote_code": True}
