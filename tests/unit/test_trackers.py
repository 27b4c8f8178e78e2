"""run.report_to: the config check, and what each tracker writes, read back with its library's reader
(the trackers driven directly here; tests/integration/test_trackers_run.py runs them in a real run)."""

import json
import sys

import pytest
import yaml

from driver.cli import main
from driver.config import Config, ConfigError, load_config
from driver.trackers import Trackers
from tracker_readers import expected_series, read_mlflow, read_tensorboard, read_wandb

ROWS = [
    {"step": 1, "phase": 0, "phase_kind": "online", "loss": 0.75, "policy_lag": 0.0, "buffer_size": 8,
     "reward_margin": None},
    {"step": 2, "phase": 0, "phase_kind": "online", "loss": 0.5, "policy_lag": 1.0, "buffer_size": 12,
     "reward_margin": 0.25, "eval_exact_match": 0.125, "eval_rouge_l": 0.5},
    {"step": 3, "phase": 0, "phase_kind": "online", "loss": 0.25, "policy_lag": 0.0, "buffer_size": 16,
     "reward_margin": 0.5},
    {"step": 4, "phase": 0, "phase_kind": "online", "loss": 0.125, "policy_lag": 1.0, "buffer_size": 16,
     "reward_margin": 1.0, "eval_exact_match": 0.25, "eval_rouge_l": 0.75},
]
SUMMARY = {"steps": 4, "wall_s": 12.5, "first_loss": 0.75, "last_loss": 0.125, "final_model": "final",
           "eval_after": {"exact_match": 0.25}, "buffer": {"size": 16}}


def test_unknown_tracker_lists_the_valid_ones():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["run.report_to=[tensorboard, comet]"])
    assert str(e.value) == "run.report_to[1]='comet': must be one of 'tensorboard', 'wandb', 'mlflow'"


def test_default_is_no_tracker():
    assert Config().run.report_to == [] and load_config(None, []).run.report_to == []


@pytest.mark.parametrize("name,module", [("wandb", "wandb"), ("mlflow", "mlflow"), ("tensorboard", "tensorboard")])
def test_named_but_not_installed_stops_before_anything_starts(tmp_path, capsys, monkeypatch, name, module):
    monkeypatch.setitem(sys.modules, module, None)  # what `import wandb` sees when it is not installed
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"run": {"report_to": [name]}}))
    code = main(["train", str(cfg), "--run-dir", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err == (f"raykd: error: run.report_to: {name} is not installed: pip install 'raykd[{name}]' "
                   f"(or pip install {module})")
    assert not (tmp_path / "run").exists()  # nothing was started or written


def _drive(run_dir, names, rows, summary, resume_step=None):
    trackers = Trackers(names)
    cfg = load_config(None, ["run.name=tracked", f"run.runs_dir={run_dir.parent}",
                             "schedule=[{kind: online, steps: 4}]"]).to_dict()
    trackers.start(cfg, run_dir, resume_step=resume_step)
    for row in rows:
        trackers.log(row, row["step"])
    trackers.log_summary(summary)
    trackers.finish()


@pytest.fixture
def no_tracker_env(monkeypatch):
    for var in ("WANDB_MODE", "MLFLOW_TRACKING_URI", "WANDB_PROJECT", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")


def test_tensorboard_gets_rows_config_and_summary(tmp_path, no_tracker_env):
    pytest.importorskip("tensorboard")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    _drive(run_dir, ["tensorboard"], ROWS, SUMMARY)
    tb = read_tensorboard(run_dir / "tensorboard")
    series = {k: v for k, v in tb["scalars"].items() if not k[0].startswith("summary/")}
    assert series == pytest.approx(expected_series(ROWS))
    assert ("reward_margin", 1) not in series and not any(k == "phase_kind" for k, _ in series)
    assert tb["steps"]["eval_exact_match"] == [2, 4]  # eval scores: a series of their own
    assert tb["scalars"][("summary/eval_after.exact_match", 4)] == 0.25
    assert tb["scalars"][("summary/first_loss", 4)] == 0.75
    assert json.loads(tb["text"]["summary/text_summary"].strip("`\n")) == SUMMARY
    assert yaml.safe_load(tb["text"]["config/text_summary"].strip("`\n"))["run"]["name"] == "tracked"
    assert tb["hparams"]["run.name"] == "tracked" and tb["hparams"]["learner.batch_size"] == 8
    assert tb["hparams"]["schedule[0].steps"] == 4


def test_tensorboard_resume_drops_the_steps_after_the_checkpoint(tmp_path, no_tracker_env):
    pytest.importorskip("tensorboard")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    _drive(run_dir, ["tensorboard"], ROWS, {"steps": 4})  # ran to step 4, checkpointed at 2
    redone = [{**r, "loss": r["loss"] + 10} for r in ROWS[2:]]
    _drive(run_dir, ["tensorboard"], redone, {"steps": 4}, resume_step=2)
    tb = read_tensorboard(run_dir / "tensorboard")
    assert tb["steps"]["loss"] == [1, 2, 3, 4]  # not 1, 2, 3, 4, 3, 4
    assert [tb["scalars"][("loss", s)] for s in (1, 2, 3, 4)] == [0.75, 0.5, 10.25, 10.125]


def test_wandb_offline_run(tmp_path, no_tracker_env):
    pytest.importorskip("wandb")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    _drive(run_dir, ["wandb"], ROWS, SUMMARY)
    [run] = read_wandb(run_dir / "wandb")
    assert run["history"] == pytest.approx(expected_series(ROWS))
    assert run["run"]["display_name"] == "tracked" and run["run"]["project"] == "raykd"
    config = run["run"]["config"]["update"]
    assert config["run"]["name"] == "tracked" and config["learner"]["batch_size"] == 8
    assert run["summary"]["first_loss"] == 0.75 and run["summary"]["eval_after.exact_match"] == 0.25
    assert run["summary"]["final_model"] == "final"
    ids = json.loads((run_dir / "trackers.json").read_text())
    assert run["file"].name == f"run-{ids['wandb']}.wandb"  # the id a --resume continues


def test_wandb_mode_from_the_environment(tmp_path, no_tracker_env, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    _drive(run_dir, ["wandb"], ROWS, SUMMARY)
    assert not list(run_dir.glob("wandb/*run-*"))  # disabled: W&B wrote no run at all


def test_mlflow_file_store_in_runs_dir(tmp_path, no_tracker_env):
    pytest.importorskip("mlflow")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    _drive(run_dir, ["mlflow"], ROWS, SUMMARY)
    [run] = read_mlflow((tmp_path / "mlruns").as_uri())
    assert run["info"].run_name == "tracked" and run["info"].status == "FINISHED"
    series = {k: v for k, v in run["history"].items() if not k[0].startswith("summary/")}
    assert series == pytest.approx(expected_series(ROWS))
    assert run["params"]["run.name"] == "tracked" and run["params"]["learner.lr"] == "5e-05"
    assert run["params"]["schedule.0.steps"] == "4"  # MLflow names allow no brackets
    assert run["history"][("summary/eval_after.exact_match", 4)] == 0.25
    assert run["summary"] == SUMMARY


def test_mlflow_tracking_uri_from_the_environment(tmp_path, no_tracker_env, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    store = tmp_path / "elsewhere"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.as_uri())
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "kd-runs")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    _drive(run_dir, ["mlflow"], ROWS[:1], {"steps": 1})
    assert not (tmp_path / "mlruns").exists()
    [run] = read_mlflow(store.as_uri(), "kd-runs")
    assert run["history"][("loss", 1)] == 0.75


def test_mlflow_resume_continues_the_same_run(tmp_path, no_tracker_env):
    pytest.importorskip("mlflow")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    _drive(run_dir, ["mlflow"], ROWS[:2], {"steps": 2})
    _drive(run_dir, ["mlflow"], ROWS[2:], SUMMARY, resume_step=2)
    [run] = read_mlflow((tmp_path / "mlruns").as_uri())
    assert {s for (k, s) in run["history"] if k == "loss"} == {1, 2, 3, 4}
    assert run["summary"] == SUMMARY and run["info"].status == "FINISHED"


def test_wandb_resume_keeps_the_run_id(tmp_path, no_tracker_env):
    pytest.importorskip("wandb")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    _drive(run_dir, ["wandb"], ROWS[:2], {"steps": 2})
    _drive(run_dir, ["wandb"], ROWS[2:], SUMMARY, resume_step=2)
    first, second = read_wandb(run_dir / "wandb")
    assert first["file"].name == second["file"].name  # the same run id, in a second offline directory
    assert first["history"] == pytest.approx(expected_series(ROWS[:2]))
    assert second["history"] == pytest.approx(expected_series(ROWS[2:]))
    assert second["summary"]["last_loss"] == 0.125
