"""Experiment trackers (``run.report_to``): TensorBoard, Weights & Biases and MLflow, as TRL names them.

Every tracker gets the same things: the resolved config as hyper-parameters (``start``), every
``metrics.jsonl`` row with its numeric keys unchanged and ``step`` as the x-axis (``log``; periodic
eval scores are the ``eval_*`` keys of the rows where an eval ran, so they are series of their own),
and the run summary at the end (``log_summary``). All of them work without a network:

- ``tensorboard``: event files in ``RUN_DIR/tensorboard`` (``tensorboard --logdir runs``);
- ``wandb``: offline mode unless ``WANDB_MODE`` says otherwise, in ``RUN_DIR/wandb``
  (``wandb sync RUN_DIR/wandb/offline-run-*`` uploads it later); ``WANDB_PROJECT`` names the project;
- ``mlflow``: ``MLFLOW_TRACKING_URI`` if set, else a file store in ``RUN.RUNS_DIR/mlruns`` (all runs in
  one place, for ``mlflow ui --backend-store-uri runs/mlruns``); ``MLFLOW_EXPERIMENT_NAME`` names the
  experiment (default ``raykd``).

The libraries are optional extras (``pip install raykd[tensorboard]`` ...), imported only when named.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import secrets
import time
from pathlib import Path

import yaml

from driver.runs import flatten
from kd.errors import UserInputError

# name -> (module that must be importable, pip extra)
TRACKERS = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
            "mlflow": ("mlflow", "mlflow")}
IDS_FILE = "trackers.json"  # the W&B / MLflow run ids, so that a --resume continues the same runs


class TrackerError(UserInputError):
    """A tracker named in run.report_to that cannot run (not installed)."""


def missing(names: list[str]) -> str | None:
    """A one-line problem for the first tracker in ``names`` that is not installed, else None."""
    for name in names:
        module, extra = TRACKERS[name]
        if importlib.util.find_spec(module) is None:
            return f"run.report_to: {name} is not installed: pip install 'raykd[{extra}]' (or pip install {module})"
    return None


def scalars(row: dict) -> dict[str, float]:
    """The finite numeric values of a row (bools as 0/1); strings, None and ``step`` are left out."""
    out = {}
    for k, v in row.items():
        if k == "step" or v is None or isinstance(v, str):
            continue
        if isinstance(v, (bool, int, float)) and math.isfinite(float(v)):
            out[k] = float(v)
    return out


def _param(v) -> str | int | float | bool:
    return v if isinstance(v, (str, int, float, bool)) else json.dumps(v)


class Tracker:
    name = ""

    def start(self, config: dict, run_dir: Path, ids: dict, resume_step: int | None) -> None: ...

    def log(self, row: dict, step: int) -> None: ...

    def log_summary(self, summary: dict) -> None: ...

    def finish(self, failed: bool = False) -> None: ...


class TensorBoard(Tracker):
    name = "tensorboard"

    def start(self, config, run_dir, ids, resume_step):
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        # purge_step: a resumed run drops the events logged after its checkpoint's step (they are redone)
        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"),
                                    purge_step=None if resume_step is None else resume_step + 1)
        if resume_step is None:
            flat = {k: _param(v) for k, v in flatten(config).items() if v is not None}
            for summary in hparams(flat, {}):  # the HParams tab, in this run's own event file
                self.writer.file_writer.add_summary(summary)
            self.writer.add_text("config", "```\n" + yaml.safe_dump(config, sort_keys=False) + "```")

    def log(self, row, step):
        for k, v in scalars(row).items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def log_summary(self, summary):
        step = summary.get("steps", 0)
        for k, v in scalars(flatten(summary)).items():
            self.writer.add_scalar(f"summary/{k}", v, step)
        self.writer.add_text("summary", "```\n" + json.dumps(summary, indent=1) + "\n```", step)
        self.writer.flush()

    def finish(self, failed=False):
        self.writer.close()


class WandB(Tracker):
    name = "wandb"

    def start(self, config, run_dir, ids, resume_step):
        import wandb

        ids.setdefault("wandb", secrets.token_hex(4))  # a W&B run id: 8 characters of [0-9a-z]
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "raykd"), name=config["run"]["name"],
                              id=ids["wandb"], resume="allow", dir=str(run_dir), config=config,
                              mode=os.environ.get("WANDB_MODE", "offline"))

    def log(self, row, step):
        self.run.log(scalars(row), step=step)

    def log_summary(self, summary):
        self.run.summary.update({k: v for k, v in flatten(summary).items() if v is not None})

    def finish(self, failed=False):
        self.run.finish(exit_code=1 if failed else 0)


def _mlflow_name(key: str) -> str:
    """MLflow names allow no brackets: schedule[0].steps -> schedule.0.steps."""
    return key.replace("[", ".").replace("]", "")


class MLflow(Tracker):
    name = "mlflow"

    def start(self, config, run_dir, ids, resume_step):
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            uri = (Path(config["run"]["runs_dir"]).expanduser().resolve() / "mlruns").as_uri()
            # MLflow 3 keeps its file store but asks for this opt-in; a sqlite:// or http:// URI in
            # MLFLOW_TRACKING_URI is used as it is
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        if "mlflow" in ids:
            self.run_id = ids["mlflow"]
            self.client.update_run(self.run_id, status="RUNNING")
            return
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "raykd")
        exp = self.client.get_experiment_by_name(name)
        exp_id = exp.experiment_id if exp else self.client.create_experiment(name)
        self.run_id = ids["mlflow"] = self.client.create_run(exp_id, run_name=config["run"]["name"]).info.run_id
        params = [Param(_mlflow_name(k), str(_param(v))[:6000]) for k, v in flatten(config).items()]
        for i in range(0, len(params), 100):  # log_batch takes at most 100 params a call
            self.client.log_batch(self.run_id, params=params[i:i + 100])

    def _metrics(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(_mlflow_name(k), v, now, step) for k, v in values.items()]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])

    def log(self, row, step):
        self._metrics(scalars(row), step)

    def log_summary(self, summary):
        self._metrics({f"summary/{k}": v for k, v in scalars(flatten(summary)).items()}, summary.get("steps", 0))
        self.client.log_dict(self.run_id, summary, "summary.json")

    def finish(self, failed=False):
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


_CLASSES = {"tensorboard": TensorBoard, "wandb": WandB, "mlflow": MLflow}


class Trackers:
    """The trackers of ``run.report_to`` behind one interface; with none named every call is a no-op."""

    def __init__(self, names: list[str]):
        problem = missing(names)
        if problem:
            raise TrackerError(problem)
        self.trackers: list[Tracker] = [_CLASSES[n]() for n in dict.fromkeys(names)]
        self.started: list[Tracker] = []

    def start(self, config: dict, run_dir: Path, resume_step: int | None = None) -> None:
        """``resume_step``: the checkpoint's step when the run continues (--resume), else None."""
        run_dir = Path(run_dir)
        ids_path = run_dir / IDS_FILE
        ids = json.loads(ids_path.read_text()) if ids_path.is_file() and resume_step is not None else {}
        for t in self.trackers:
            t.start(config, run_dir, ids, resume_step)
            self.started.append(t)
        if ids:
            ids_path.write_text(json.dumps(ids, indent=1))

    def log(self, row: dict, step: int) -> None:
        for t in self.started:
            t.log(row, step)

    def log_summary(self, summary: dict) -> None:
        for t in self.started:
            t.log_summary(summary)

    def finish(self, failed: bool = False) -> None:
        for t in self.started:
            t.finish(failed)
        self.started = []
