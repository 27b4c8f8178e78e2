"""What a run wrote to each experiment tracker, read back with that library's own reader (used by
tests/unit/test_trackers.py and tests/integration/test_trackers_run.py)."""

import json
import subprocess
import sys
from pathlib import Path


def numeric(row: dict) -> dict:
    """The values of a metrics.jsonl row a tracker must get: every number but the step."""
    return {k: float(v) for k, v in row.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


def expected_series(rows: list[dict]) -> dict:
    return {(k, r["step"]): v for r in rows for k, v in numeric(r).items()}


def read_tensorboard(log_dir: Path) -> dict:
    """{"scalars": {(tag, step): value}, "text": {tag: str}, "hparams": {name: value}} of the event
    files in ``log_dir``, through tensorboard's EventAccumulator (the last value of a (tag, step))."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    scalars = {(tag, ev.step): ev.value for tag in acc.Tags()["scalars"] for ev in acc.Scalars(tag)}
    steps = {tag: [ev.step for ev in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    text = {t: acc.Tensors(t)[-1].tensor_proto.string_val[0].decode() for t in acc.Tags()["tensors"]}
    hparams = {}
    content = acc.PluginTagToContent("hparams").get("_hparams_/session_start_info")
    if content:
        for k, v in plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams.items():
            kind = v.WhichOneof("kind")
            hparams[k] = getattr(v, kind) if kind else None
    return {"scalars": scalars, "steps": steps, "text": text, "hparams": hparams}


def read_wandb(wandb_dir: Path) -> list[dict]:
    """For each offline run under ``wandb_dir`` (oldest first): its history {(key, step): value}, run
    record (name, project, config) and final summary, through W&B's own transaction-log reader
    (`wandb leet inspect --json`)."""
    wandb = Path(sys.executable).parent / "wandb"
    runs = []
    for path in sorted(Path(wandb_dir).glob("offline-run-*/run-*.wandb")):
        out = subprocess.run([str(wandb), "leet", "inspect", "--json", str(path)], capture_output=True,
                             text=True, check=True, timeout=120).stdout
        records = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        history, summary, run = {}, {}, None
        for rec in records:
            if rec["type"] == "history":
                step = int(rec["history"]["step"]["num"])
                history.update({(k, step): v for k, v in rec["history"]["item"].items() if not k.startswith("_")})
            elif rec["type"] == "summary":
                summary.update(rec["summary"]["update"])
            elif rec["type"] == "run":
                run = rec["run"]
        runs.append({"file": path, "history": history, "summary": summary, "run": run})
    return runs


def read_mlflow(tracking_uri: str, experiment: str = "raykd") -> list[dict]:
    """Every run of ``experiment`` in the store: info, params, metric histories {(key, step): value}
    and the summary.json artifact, through mlflow's MlflowClient."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    out = []
    for run in client.search_runs([exp.experiment_id]):
        history = {}
        for key in run.data.metrics:
            for m in client.get_metric_history(run.info.run_id, key):
                history[(key, m.step)] = m.value
        art = Path(run.info.artifact_uri.removeprefix("file://")) / "summary.json"
        out.append({"info": run.info, "params": run.data.params, "history": history,
                    "summary": json.loads(art.read_text()) if art.is_file() else None})
    return out
