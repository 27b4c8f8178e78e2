"""The Grafana board (driver/grafana/raykd.json): Grafana dashboard JSON by Grafana's own schema types
(grafana-foundation-sdk), Prometheus panels whose queries parse (promql-parser), and every metric it
queries is one raykd exports (``actors.metrics``, as Ray names it in Prometheus: ``ray_`` + name, which
tests/integration/test_ray_metrics.py reads back from a live Ray node), and every one raykd exports is
on the board. Also ``raykd grafana``."""

import json
import re

import promql_parser  # the test extra: pip install -e ".[test]"
from grafana_foundation_sdk.models import dashboard as sdk_dashboard

from actors import metrics
from driver.cli import main
from driver.grafana import DASHBOARD

BOARD = json.loads(DASHBOARD.read_text())
PANELS = [p for p in BOARD["panels"] if p["type"] != "row"]
EXPORTED = {"ray_" + name: kind for name, (kind, _) in metrics._DEFS.items()}  # as Prometheus shows them


def variables() -> dict[str, list[str]]:
    """Each template variable and values to try it with: an interval's options, '.*' for a query."""
    out = {}
    for v in BOARD["templating"]["list"]:
        if v["type"] == "interval":
            out[v["name"]] = [o["value"] for o in v["options"]]
        elif v["type"] == "query":
            out[v["name"]] = [".*"]
    return out


def expressions():
    """Every (panel title, query) with its template variables substituted, once per variable value."""
    values = variables()
    for panel in PANELS:
        for target in panel["targets"]:
            used = set(re.findall(r"\$(\w+)", target["expr"])) - {"datasource"}
            assert used <= set(values), (panel["title"], used - set(values))  # defined on the board
            texts = [target["expr"]]
            for name in used:
                texts = [t.replace(f"${name}", v) for t in texts for v in values[name]]
            for text in texts:
                yield panel["title"], text


def selectors(expr: str) -> tuple[set[str], set[str]]:
    """(metric names selected, those selected over a range, e.g. inside rate()), from the parsed query."""
    names, ranged = set(), set()

    def visit(node, *_):
        if isinstance(node, promql_parser.MatrixSelector):
            ranged.add(node.vector_selector.name)
        if isinstance(node, promql_parser.VectorSelector):
            names.add(node.name)

    promql_parser.walk(promql_parser.parse(expr), visit)
    return names, ranged


def test_board_is_grafana_dashboard_json():
    """Decoded with Grafana's schema types and encoded again, nothing is lost: every key the board has
    is one the dashboard schema knows (a misspelt key would be dropped)."""
    decoded = sdk_dashboard.Dashboard.from_json(BOARD)
    again = json.loads(json.dumps(decoded.to_json(), default=lambda o: o.to_json()))

    def lost(a, b, path=""):
        if isinstance(a, dict):
            return [x for k in a for x in ([f"{path}/{k}"] if k not in b else lost(a[k], b[k], f"{path}/{k}"))]
        if isinstance(a, list):
            return [f"{path}: length"] if len(a) != len(b) else [
                x for i, (p, q) in enumerate(zip(a, b)) for x in lost(p, q, f"{path}[{i}]")]
        return [] if a == b else [f"{path}: {a!r} -> {b!r}"]

    assert lost(BOARD, again) == []
    assert BOARD["title"] == "raykd" and BOARD["uid"] == "raykd"


def test_panels_are_prometheus_queries_laid_out_on_the_grid():
    ids = [p["id"] for p in BOARD["panels"]]
    assert len(ids) == len(set(ids))
    cells = set()
    for p in BOARD["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not mine & cells, f"{p['title']} overlaps another panel"
        cells |= mine
    source = next(v for v in BOARD["templating"]["list"] if v["name"] == "datasource")
    assert source["type"] == "datasource" and source["query"] == "prometheus"
    for p in PANELS:
        assert p["type"] == "timeseries" and p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        refs = [t["refId"] for t in p["targets"]]
        assert refs and len(refs) == len(set(refs)), p["title"]
        assert all(t["expr"] and t["datasource"]["type"] == "prometheus" for t in p["targets"]), p["title"]


def test_every_queried_metric_is_exported_and_every_exported_one_is_on_the_board():
    queried = set()
    for title, expr in expressions():
        names, ranged = selectors(expr)
        assert names <= set(EXPORTED), (title, names - set(EXPORTED))
        for name in names:  # counters only make sense as a rate; gauges are read as they are
            assert (name in ranged) == (EXPORTED[name] == "counter"), (title, name)
        queried |= names
    assert queried == set(EXPORTED)
    titles = " ".join(p["title"].lower() for p in PANELS)
    for word in ("per actor", "buffer", "policy lag", "loss", "sync", "agreement", "entropy"):
        assert word in titles


def test_raykd_grafana_prints_and_installs_the_board(tmp_path, capsys):
    assert main(["grafana"]) == 0
    assert capsys.readouterr().out.strip() == str(DASHBOARD)
    assert main(["grafana", "--install", str(tmp_path)]) == 0
    assert (tmp_path / "raykd.json").read_bytes() == DASHBOARD.read_bytes()
    capsys.readouterr()
    assert main(["grafana", "--install", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("raykd: error: ") and str(tmp_path / "missing") in err and len(err.splitlines()) == 1
