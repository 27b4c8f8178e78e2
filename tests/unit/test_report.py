"""`raykd report` (plots drawn from metrics.jsonl, report.md), and the terminal monitoring helpers."""

import json
import math

import pytest

from driver.cli import main
from driver.monitoring import MetricsLog, ProgressBar, format_summary, progress_postfix, read_metrics
from driver.report import make_report, plot_metric, load_run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_run(root, name, n=6, scale=1.0, with_eval=True, dpkd=True):
    run = root / name
    run.mkdir(parents=True)
    rows = []
    for step in range(1, n + 1):
        row = {"step": step, "policy_version": step // 2, "loss": scale * (1.0 / step),
               "sft_loss": None,  # another loss type's column: null throughout
               "samples_per_s": 2.0 + step * scale, "policy_lag": float(step % 2), "buffer_size": 8 * step,
               "weight_sync_s": 0.1, "elapsed_s": step * 1.5, "pairs_added": 8 * step}
        if dpkd:
            row["reward_margin"] = 0.1 * step * scale
        if step == 3:
            row["loss"] = None  # a null loss is skipped, not plotted as 0
        if with_eval and step % 3 == 0:
            row.update(eval_exact_match=0.1 * step, eval_rouge_l=0.05 * step, eval_s=0.2)
        rows.append(row)
    with open(run / "metrics.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return run, rows


def expected(rows, key):
    pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
    return [float(x) for x, _ in pts], [float(y) for _, y in pts]


def check_png(path):
    data = path.read_bytes()
    assert len(data) > 1000 and data[:8] == PNG_MAGIC


def test_report_of_one_run_plots_its_metrics(tmp_path):
    run, rows = write_run(tmp_path, "run-a")
    (run / "summary.json").write_text(json.dumps({"wall_s": 9.0, "pairs_added": 48,
                                                  "probe": {"before": "x  y", "after": "#### 4"}}))
    rep = make_report([run])
    assert rep.out_dir == run / "report"
    assert set(rep.plots) == {"loss", "reward_margin", "eval", "throughput", "policy_lag"}
    for png in rep.plots.values():
        check_png(png)
    # the curves are the run's metrics, read back from the drawn lines
    assert rep.lines["loss"] == {"loss": expected(rows, "loss")}
    assert 3.0 not in rep.lines["loss"]["loss"][0]  # the null step is absent
    assert rep.lines["throughput"]["samples_per_s"] == expected(rows, "samples_per_s")
    assert rep.lines["policy_lag"]["policy_lag"] == expected(rows, "policy_lag")
    assert rep.lines["reward_margin"]["reward_margin"] == expected(rows, "reward_margin")
    assert rep.lines["eval"] == {"eval_exact_match": expected(rows, "eval_exact_match"),
                                 "eval_rouge_l": expected(rows, "eval_rouge_l")}
    md = rep.markdown.read_text()
    for png in rep.plots.values():
        assert f"]({png.name})" in md
    assert "| loss | run-a | 1 | 0.1667 | 0.1667 |" in md  # first, last, best (min) of the loss
    assert "| eval_exact_match | run-a | 0.3 | 0.6 | 0.6 |" in md  # best is the max for scores
    assert "| buffer_size | run-a | 8 | 48 | - |" in md  # no direction: no best
    assert "sft_loss" not in md  # null throughout: not tabulated
    assert "#### 4" in md and "| 9 |" in md


def test_report_overlays_several_runs(tmp_path):
    a, rows_a = write_run(tmp_path, "a", n=6)
    b, rows_b = write_run(tmp_path / "other", "b", n=4, scale=2.0, with_eval=False, dpkd=False)
    out = tmp_path / "cmp"
    rep = make_report([a, b], out)
    assert rep.out_dir == out and rep.markdown == out / "report.md"
    assert rep.lines["loss"] == {"a": expected(rows_a, "loss"), "b": expected(rows_b, "loss")}
    assert rep.lines["throughput"]["b"] == expected(rows_b, "samples_per_s")
    # a metric only one run has is drawn for that run only
    assert set(rep.lines["reward_margin"]) == {"a"}
    assert set(rep.lines["eval"]) == {"a: eval_exact_match", "a: eval_rouge_l"}
    for png in rep.plots.values():
        check_png(png)


def test_plot_metric_returns_the_figure_and_skips_absent_metrics(tmp_path):
    run, rows = write_run(tmp_path, "r")
    r = load_run(run)
    fig, lines = plot_metric([r], ["loss"], "t", "y")
    assert fig is not None and lines["loss"] == expected(rows, "loss")
    assert fig.axes[0].get_xlabel() == "step"
    assert plot_metric([r], ["no_such_metric"], "t", "y") == (None, {})


def test_report_without_eval_or_margin_skips_those_plots(tmp_path):
    run, _ = write_run(tmp_path, "sft", with_eval=False, dpkd=False)
    (run / "report").mkdir()
    (run / "report" / "eval.png").write_bytes(b"stale")
    rep = make_report([run])
    assert set(rep.plots) == {"loss", "throughput", "policy_lag"}
    assert not (run / "report" / "eval.png").exists()
    assert ("Not plotted (no values in any run): reward_margin, eval, agreement, entropy, lengths, truncated, "
            "train_exact_match." in rep.markdown.read_text())


def test_report_cli(tmp_path, capsys):
    run, _ = write_run(tmp_path, "r")
    assert main(["report", str(run), "--out", str(tmp_path / "o")]) == 0
    assert (tmp_path / "o" / "report.md").is_file() and (tmp_path / "o" / "loss.png").is_file()


@pytest.mark.parametrize("content, message", [
    (None, "metrics.jsonl: no such file"),
    ("", "metrics.jsonl: empty"),
    ("\n\n", "metrics.jsonl: empty"),
    ('{"step": 1}\nnot json\n', "metrics.jsonl:2: invalid JSON"),
])
def test_report_bad_metrics_file_is_one_line(tmp_path, capsys, content, message):
    run = tmp_path / "run"
    run.mkdir()
    if content is not None:
        (run / "metrics.jsonl").write_text(content)
    assert main(["report", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("raykd: error: ") and message in err and str(run) in err
    assert len(err.splitlines()) == 1


def test_report_missing_run_dir(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"raykd: error: {tmp_path / 'nope'}: run directory does not exist"


# --------------------------------------------------------------------------------------------
# Terminal monitoring
# --------------------------------------------------------------------------------------------


def test_metrics_log_round_trip(tmp_path):
    log = MetricsLog(tmp_path / "m.jsonl")
    log.write({"step": 1, "loss": float("nan")})
    log.write({"step": 2, "loss": 0.5})
    assert log.first == {"step": 1, "loss": None} and log.last["loss"] == 0.5
    assert read_metrics(tmp_path / "m.jsonl") == [{"step": 1, "loss": None}, {"step": 2, "loss": 0.5}]


def test_progress_postfix_handles_missing_and_null_values():
    row = {"step": 3, "loss": None, "samples_per_s": 12.345, "buffer_size": 40, "policy_lag": 0.5,
           "policy_version": 1, "eval_exact_match": 0.25}
    post = progress_postfix(row, buffer_capacity=256)
    assert post == {"loss": "-", "samples/s": "12.35", "buffer": "40/256", "lag": "0.50", "v": "1",
                    "exact_match": "0.250"}
    assert progress_postfix({})["buffer"] == "-"
    bar = ProgressBar(2, enabled=True, buffer_capacity=8)
    bar.update(row)
    bar.update({})
    bar.close()
    assert bar.bar.n == 2


def test_format_summary():
    summary = {"steps": 24, "policy_version": 12, "wall_s": 96.0, "pairs_added": 400,
               "first_loss": 0.71234, "last_loss": 0.40321,
               "buffer": {"size": 200, "capacity": 256, "inserted": 400, "consumed": 192, "dropped_stale": 8,
                          "evicted": 0, "mean_policy_lag": 0.5},
               "probe": {"prompt": "<|im_start|>user\nWhat is 2+2?", "before": "random   text",
                         "after": "2 + 2 = 4\n#### 4"},
               "final_model": "runs/x/final", "eval_exact_match": 0.5, "eval_exact_match_std": 0.1, "eval_s": 3.0}
    text = format_summary(summary)
    lines = text.splitlines()
    assert lines[0] == "== raykd run summary =="
    assert "steps        24 in 1m36s (0.25 steps/s)" in lines
    assert "loss         0.7123 -> 0.4032" in lines
    assert "pairs        400 added (4.17/s)" in lines
    buffer_line = next(ln for ln in lines if ln.startswith("buffer "))
    assert buffer_line.startswith("buffer       size 200/256, inserted 400") and "dropped stale 8" in buffer_line
    assert "  after      '2 + 2 = 4 #### 4'" in lines
    assert "final model  runs/x/final" in lines
    assert "eval         exact_match 0.500" in lines
    assert format_summary({}) == "== raykd run summary =="
    assert "loss         - -> -" in format_summary({"first_loss": None, "last_loss": math.nan})


def test_format_summary_shows_held_out_scores_before_and_after():
    text = format_summary({"eval_before": {"exact_match": 0.0, "rouge_l": 0.012, "answer_rate": 0.1},
                           "eval_after": {"exact_match": 0.125, "rouge_l": 0.2, "answer_rate": 0.9},
                           "eval_teacher": {"exact_match": 0.25, "rouge_l": 0.3}})
    lines = text.splitlines()
    assert "held-out     exact_match 0.000 -> 0.125 (teacher 0.250)" in lines
    assert "             rouge_l 0.012 -> 0.200 (teacher 0.300)" in lines
    assert "             answer_rate 0.100 -> 0.900" in lines  # no teacher value: none shown
    # an interrupted run has no after-score yet
    assert "held-out     rouge_l 0.500 -> -" in format_summary({"eval_before": {"rouge_l": 0.5}}).splitlines()
