"""``raykd report RUN_DIR [RUN_DIR ...] [--out DIR]``: PNG plots and a Markdown summary of runs.

Plots against the training step (one PNG each, skipped when no run has the metric): loss, reward
margin, eval metrics (``eval_*`` columns, written by periodic evaluation), throughput (samples/s),
policy lag, and the distillation health metrics (``kd.health``: agreement, entropy, lengths, truncated
share, exact match on the training prompts). Several runs are overlaid on the same axes, labelled by
run name (the directory name). ``report.md`` embeds the plots and tabulates first / last / best value
per metric and run.

Rows of metrics.jsonl may lack keys or hold null (other loss types, steps before the first eval):
those points are simply absent from a curve. Figures are drawn with matplotlib's Agg canvas (no
display, no pyplot global state).
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

from driver.monitoring import read_metrics
from kd.errors import UserInputError


class ReportError(UserInputError):
    pass


@dataclass
class Run:
    name: str
    path: Path
    rows: list[dict]
    summary: dict = field(default_factory=dict)


@dataclass
class PlotSpec:
    name: str  # file stem
    title: str
    ylabel: str
    keys: tuple[str, ...] = ()  # empty: every eval_* key found


PLOTS = (
    PlotSpec("loss", "Training loss", "loss", ("loss",)),
    PlotSpec("reward_margin", "Reward margin (chosen - rejected implicit reward)", "reward margin",
             ("reward_margin",)),
    PlotSpec("eval", "Evaluation (held out)", "score"),
    PlotSpec("throughput", "Throughput", "samples/s", ("samples_per_s",)),
    PlotSpec("policy_lag", "Policy lag", "versions", ("policy_lag",)),
    # distillation health (kd.health)
    PlotSpec("agreement", "Student/teacher agreement on trained tokens, teacher top-k mass", "share",
             ("top1_agreement", "topk_overlap", "teacher_topk_mass")),
    PlotSpec("entropy", "Student entropy on trained tokens", "nats", ("student_entropy",)),
    PlotSpec("lengths", "Response length (y_t teacher, y_s student)", "tokens", ("y_t_len", "y_s_len")),
    PlotSpec("truncated", "Responses that hit max_new_tokens", "share", ("y_t_truncated", "y_s_truncated")),
    PlotSpec("train_exact_match", "Exact match on the training prompts", "exact match",
             ("y_t_exact_match", "y_s_exact_match")),
)

# metrics tabulated in report.md; "best" is the min or max by the metric's direction (none: "-")
LOWER_IS_BETTER = {"loss", "dpkd_loss", "sft_loss", "rejected_reward", "policy_lag", "step_time_s",
                   "weight_sync_s", "train_step_s", "y_s_truncated"}
HIGHER_IS_BETTER = {"reward_margin", "reward_accuracy", "chosen_reward", "samples_per_s", "top1_agreement",
                    "topk_overlap", "y_s_exact_match"}
TABLE_KEYS = ("loss", "dpkd_loss", "sft_loss", "reward_margin", "reward_accuracy", "chosen_reward",
              "rejected_reward", "samples_per_s", "policy_lag", "buffer_size", "step_time_s", "weight_sync_s",
              "teacher_topk_mass", "top1_agreement", "topk_overlap", "student_entropy", "y_t_len", "y_s_len",
              "y_t_truncated", "y_s_truncated", "y_t_exact_match", "y_s_exact_match")


def _num(v) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def load_run(path: str | Path) -> Run:
    path = Path(path).expanduser()
    if not path.is_dir():
        raise ReportError(f"{path}: run directory does not exist")
    rows = read_metrics(path / "metrics.jsonl")
    summary = {}
    if (path / "summary.json").is_file():
        try:
            summary = json.loads((path / "summary.json").read_text())
        except json.JSONDecodeError:
            summary = {}  # a summary is optional decoration; the metrics are what matter
    return Run(path.resolve().name, path, rows, summary if isinstance(summary, dict) else {})


def _unique_names(runs: list[Run]) -> None:
    seen: dict[str, int] = {}
    for run in runs:
        if run.name in seen:
            seen[run.name] += 1
            run.name = f"{run.name} ({seen[run.name]})"
        else:
            seen[run.name] = 1


def series(run: Run, key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of ``key`` over a run's rows, skipping rows where it is missing/null/non-finite."""
    xs, ys = [], []
    for i, row in enumerate(run.rows, 1):
        y = _num(row.get(key))
        if y is None:
            continue
        x = _num(row.get("step"))
        xs.append(x if x is not None else float(i))
        ys.append(y)
    return xs, ys


def eval_keys(runs: list[Run]) -> list[str]:
    """The ``eval_*`` score columns (not their ``_std`` spreads or the eval wall time)."""
    keys = []
    for run in runs:
        for row in run.rows:
            for k in row:
                if k.startswith("eval_") and not k.endswith("_std") and k != "eval_s" and k not in keys:
                    keys.append(k)
    return keys


def plot_metric(runs: list[Run], keys: list[str], title: str, ylabel: str, path: Path | None = None):
    """Draw ``keys`` of every run against step; save a PNG to ``path`` if given.

    Returns ``(figure, lines)`` with ``lines[label] = (xs, ys)`` read back from the drawn Line2D
    objects (what the PNG shows), or ``(None, {})`` when no run has any of the keys."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    drawn = [(run, key, *series(run, key)) for run in runs for key in keys]
    drawn = [d for d in drawn if d[2]]
    if not drawn:
        return None, {}
    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    styles = ("-", "--", ":", "-.")
    colors = {run.name: f"C{i % 10}" for i, run in enumerate(runs)}
    for run, key, xs, ys in drawn:
        if len(runs) > 1 and len(keys) > 1:
            label = f"{run.name}: {key}"
        else:
            label = run.name if len(runs) > 1 else key
        ax.plot(xs, ys, label=label, color=colors[run.name] if len(runs) > 1 else None,
                linestyle=styles[keys.index(key) % len(styles)] if len(runs) > 1 else "-",
                marker="o" if len(xs) < 30 else None, markersize=3)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    lines = {ln.get_label(): ([float(x) for x in ln.get_xdata()], [float(y) for y in ln.get_ydata()])
             for ln in ax.get_lines()}
    if path is not None:
        fig.savefig(path, format="png")
    return fig, lines


@dataclass
class Report:
    out_dir: Path
    markdown: Path
    plots: dict[str, Path]  # plot name -> PNG
    lines: dict[str, dict]  # plot name -> {label: (xs, ys)}


def _fmt(v) -> str:
    v = _num(v)
    if v is None:
        return "-"
    return f"{v:.4g}"


def value_table(runs: list[Run]) -> list[tuple[str, str, float | None, float | None, float | None]]:
    """(metric, run, first, last, best) for every tabulated metric a run has."""
    out = []
    for key in [*TABLE_KEYS, *eval_keys(runs)]:
        for run in runs:
            _, ys = series(run, key)
            if not ys:
                continue
            if key in LOWER_IS_BETTER:
                best = min(ys)
            elif key in HIGHER_IS_BETTER or key.startswith("eval_"):
                best = max(ys)
            else:
                best = None
            out.append((key, run.name, ys[0], ys[-1], best))
    return out


def _markdown(runs: list[Run], plots: dict[str, Path], specs: dict[str, PlotSpec], missing: list[str]) -> str:
    md = ["# raykd report", "", "| run | directory | steps | wall time (s) | pairs added |",
          "|---|---|---|---|---|"]
    for run in runs:
        last = run.rows[-1]
        md.append(f"| {run.name} | `{run.path}` | {_fmt(last.get('step', len(run.rows)))} | "
                  f"{_fmt(run.summary.get('wall_s', last.get('elapsed_s')))} | "
                  f"{_fmt(run.summary.get('pairs_added', last.get('pairs_added')))} |")
    for name, png in plots.items():
        md += ["", f"## {specs[name].title}", "", f"![{specs[name].title}]({png.name})"]
    if missing:
        md += ["", f"Not plotted (no values in any run): {', '.join(missing)}."]
    md += ["", "## Values", "",
           "Best: the minimum for losses, rejected reward, lag, times and the student's truncated share; "
           "the maximum for margins, accuracies, chosen reward, throughput, eval scores, student/teacher "
           "agreement and the student's exact match on training prompts.", "",
           "| metric | run | first | last | best |", "|---|---|---|---|---|"]
    md += [f"| {k} | {r} | {_fmt(a)} | {_fmt(b)} | {_fmt(c)} |" for k, r, a, b, c in value_table(runs)]
    probes = [(run.name, run.summary["probe"]) for run in runs if isinstance(run.summary.get("probe"), dict)]
    if probes:
        md += ["", "## Probe (greedy answer to the first prompt, before and after training)"]
        for name, probe in probes:
            md += ["", f"**{name}**", "", f"- before: `{' '.join(str(probe.get('before', '')).split())}`",
                   f"- after: `{' '.join(str(probe.get('after', '')).split())}`"]
    return "\n".join(md) + "\n"


def make_report(run_dirs: list[str | Path], out_dir: str | Path | None = None) -> Report:
    if not run_dirs:
        raise ReportError("no run directory given")
    runs = [load_run(p) for p in run_dirs]
    _unique_names(runs)
    out = Path(out_dir) if out_dir else (runs[0].path / "report" if len(runs) == 1 else Path("raykd-report"))
    out.mkdir(parents=True, exist_ok=True)
    plots, lines, missing = {}, {}, []
    specs = {s.name: s for s in PLOTS}
    for spec in PLOTS:
        keys = list(spec.keys) or eval_keys(runs)
        png = out / f"{spec.name}.png"
        fig, drawn = plot_metric(runs, keys, spec.title, spec.ylabel, png)
        if fig is None:
            missing.append(spec.name)
            png.unlink(missing_ok=True)  # a stale plot from an earlier report would mislead
            continue
        plots[spec.name], lines[spec.name] = png, drawn
    md = out / "report.md"
    md.write_text(_markdown(runs, plots, specs, missing))
    return Report(out, md, plots, lines)


def _report_cmd(args) -> int:
    rep = make_report(args.run_dirs, args.out)
    print(f"raykd: wrote {rep.markdown} and {len(rep.plots)} plots "
          f"({', '.join(p.name for p in rep.plots.values())})", file=sys.stderr)
    return 0


def register(sub) -> None:
    p = sub.add_parser("report", help="plots and a Markdown summary of one or more runs")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="output directory (default RUN_DIR/report for one run, ./raykd-report for several)")
    p.set_defaults(func=_report_cmd)
