"""benchmarks/learner_step.py at a tiny size: both variants train on the same rows, and the step that runs
each prompt once computes the same loss as the one that runs it per sequence."""

import math

from tests.benchmark_modules import load_benchmark


def test_learner_step_benchmark_times_both_variants_on_the_same_loss(capsys):
    bench = load_benchmark("learner_step")
    out = bench.main(["--tiny", "--steps", "2", "--batch", "3", "--response-tokens", "5"])
    printed = capsys.readouterr().out
    assert set(out["median_s"]) == {"prompt once per pair", "prompt once per sequence"}
    assert all(len(ts) == 2 and all(t > 0 for t in ts) for ts in out["steps_s"].values())
    pair, plain = out["first_loss"]["prompt once per pair"], out["first_loss"]["prompt once per sequence"]
    assert math.isfinite(pair) and math.isclose(pair, plain, rel_tol=1e-5, abs_tol=1e-6)
    assert out["ratio"] == out["median_s"]["prompt once per sequence"] / out["median_s"]["prompt once per pair"]
    assert "ratio (once per sequence / once per pair)" in printed
