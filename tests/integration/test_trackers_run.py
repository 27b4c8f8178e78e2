"""run.report_to on a real run (tiny models, real Ray): TensorBoard, W&B (offline) and MLflow (file store)
each get every metrics.jsonl row, the config and the summary, read back with each library's own reader."""

import json

import pytest

from driver.config import load_config
from driver.online import run_online
from driver.prepare import prepare
from tracker_readers import expected_series, read_mlflow, read_tensorboard, read_wandb

pytest.importorskip("tensorboard")
pytest.importorskip("wandb")
pytest.importorskip("mlflow")

pytestmark = [pytest.mark.usefixtures("ray_cluster"), pytest.mark.slow]


def test_every_tracker_gets_rows_config_and_summary(tiny_models, tmp_path, monkeypatch):
    for var in ("WANDB_MODE", "MLFLOW_TRACKING_URI", "WANDB_PROJECT", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = load_config(None, [
        f"models.teacher={tiny_models['teacher']}", f"models.student={tiny_models['student']}",
        f"models.cache_dir={tmp_path / 'cache'}", f"run.runs_dir={tmp_path}", "run.name=tracked",
        "run.report_to=[tensorboard, wandb, mlflow]",
        "data.num_prompts=16", "teacher.max_new_tokens=6", "sampler.max_new_tokens=6",
        "teacher.top_k_logprobs=4", "sampler.prompts_per_request=4", "buffer.capacity=64",
        "buffer.min_size_to_train=4", "learner.batch_size=4", "learner.max_steps=4",
        "sync.every_steps=2", "ray.num_cpus=6", "teacher.engine.backend=hf", "sampler.engine.backend=hf",
        "eval.every_steps=2", "eval.limit=2", "eval.max_new_tokens=4", "checkpoint.export_hf=false"])
    run_dir = tmp_path / "run"
    prep = prepare(cfg, str(run_dir))
    summary = run_online(cfg, prep, progress=False)

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    expected = expected_series(rows)
    eval_keys = {k for r in rows for k in r if k.startswith("eval_") and r[k] is not None}
    assert eval_keys, "eval.every_steps=2 must add eval_* keys to steps 2 and 4"
    assert {k for k, _ in expected} >= {"loss", "policy_lag", "buffer_size"} | eval_keys

    tb = read_tensorboard(run_dir / "tensorboard")
    assert {k: v for k, v in tb["scalars"].items() if not k[0].startswith("summary/")} == pytest.approx(expected)
    for k in eval_keys:  # eval scores: their own series, only at the steps an eval ran
        assert tb["steps"][k] == [2, 4]
    assert tb["scalars"][("summary/steps", 4)] == 4
    assert json.loads(tb["text"]["summary/text_summary"].strip("`\n"))["first_loss"] == pytest.approx(summary["first_loss"])
    assert tb["hparams"]["learner.batch_size"] == 4 and tb["hparams"]["run.name"] == "tracked"

    [wb] = read_wandb(run_dir / "wandb")
    assert wb["history"] == pytest.approx(expected)
    assert wb["run"]["display_name"] == "tracked" and wb["run"]["config"]["update"]["learner"]["batch_size"] == 4
    assert wb["summary"]["steps"] == 4 and wb["summary"]["first_loss"] == pytest.approx(summary["first_loss"])

    [ml] = read_mlflow((tmp_path / "mlruns").as_uri())
    assert ml["info"].run_name == "tracked" and ml["info"].status == "FINISHED"
    assert {k: v for k, v in ml["history"].items() if not k[0].startswith("summary/")} == pytest.approx(expected)
    assert ml["params"]["learner.batch_size"] == "4"
    assert ml["params"]["run.report_to"] == json.dumps(["tensorboard", "wandb", "mlflow"])
    assert ml["summary"]["steps"] == 4 and ml["summary"]["first_loss"] == pytest.approx(summary["first_loss"])
