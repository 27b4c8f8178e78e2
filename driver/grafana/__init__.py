"""The Grafana board for the ``raykd_*`` Ray metrics (``raykd.json`` here), and ``raykd grafana``.

``raykd grafana`` prints the board's path; ``raykd grafana --install [DIR]`` copies it into the folder
Ray's Grafana provisions dashboards from (by default the running Ray session's,
``/tmp/ray/session_latest/metrics/grafana/dashboards``, or ``$RAY_METRICS_GRAFANA_DASHBOARD_OUTPUT_DIR``
where Ray was told to use another), where Grafana picks it up within seconds. See docs/monitoring.md.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from kd.errors import UserInputError

DASHBOARD = Path(__file__).with_name("raykd.json")


class GrafanaError(UserInputError):
    pass


def ray_dashboards_dir() -> Path:
    """Where Ray's Grafana reads dashboards from, for the latest Ray session on this machine."""
    override = os.environ.get("RAY_METRICS_GRAFANA_DASHBOARD_OUTPUT_DIR")
    if override:
        return Path(override)
    return Path("/tmp/ray/session_latest/metrics/grafana/dashboards")


def install(target: str | Path | None = None) -> Path:
    """Copy the board into ``target`` (default ``ray_dashboards_dir()``); returns the file written."""
    folder = Path(target) if target else ray_dashboards_dir()
    if not folder.is_dir():
        hint = ("is a Ray session with its dashboard running on this machine? (ray start --head, or "
                "raykd train ... --set ray.include_dashboard=true)") if target is None else "no such directory"
        raise GrafanaError(f"{folder}: {hint}; or give the folder: raykd grafana --install DIR")
    out = folder / DASHBOARD.name
    shutil.copyfile(DASHBOARD, out)
    return out


def _cmd(args) -> int:
    if args.install is None:
        print(DASHBOARD)
        return 0
    out = install(args.install or None)
    print(f"raykd: wrote {out} (Grafana loads it within seconds: Dashboards > Ray > raykd)", file=sys.stderr)
    return 0


def register(sub) -> None:
    p = sub.add_parser("grafana", help="the Grafana board for raykd's Ray metrics: print its path, or install it")
    p.add_argument("--install", nargs="?", const="", default=None, metavar="DIR",
                   help="copy the board into Ray's Grafana dashboards folder (default: the latest Ray "
                        "session's, /tmp/ray/session_latest/metrics/grafana/dashboards) or into DIR")
    p.set_defaults(func=_cmd)
