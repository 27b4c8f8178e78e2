"""What a person watches while a run goes: metrics.jsonl and a terminal progress bar."""

from __future__ import annotations

import json
import math
from pathlib import Path


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None  # JSON has no NaN; a reader sees null
    return v


class MetricsLog:
    """Appends one JSON line per step; remembers the first and last rows for the summary."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.first: dict = {}
        self.last: dict = {}

    def write(self, row: dict) -> None:
        row = {k: _clean(v) for k, v in row.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        self.first = self.first or row
        self.last = row


def read_metrics(path: Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class ProgressBar:
    def __init__(self, total: int, enabled: bool = True):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc="train", unit="step", dynamic_ncols=True)

    def update(self, row: dict) -> None:
        if self.bar is None:
            return
        self.bar.set_postfix(
            loss=f"{row.get('loss', float('nan')):.4f}",
            samples_s=f"{row.get('samples_per_s', 0):.2f}",
            buffer=row.get("buffer_size"),
            lag=f"{row.get('policy_lag', 0):.2f}",
            v=row.get("policy_version"),
            refresh=False,
        )
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
