"""The cost model of benchmarks/scale.py: the fit recovers per-unit costs that generated the points, keeps
costs non-negative, tells a cost per request from one per prompt only when the request size varies, and
the predicted ceilings are the stated arithmetic."""

import pytest
from benchmark_modules import load_benchmark


def _scale():
    return load_benchmark("scale")


# the truth the points are made from: CPU s per second, step, request, prompt (row)
DRIVER = {"s": 0.01, "steps": 0.030, "requests": 0.002, "rows": 0.0005}
BUFFER = {"s": 0.02, "requests": 0.001, "rows": 0.0002}


def _point(variant, seconds, steps, P, rows):
    requests = rows / P
    window = {"s": seconds, "steps": steps, "requests": requests, "rows": rows}
    window["driver_cpu_s"] = sum(DRIVER[k] * window[k] for k in DRIVER)
    window["buffer_cpu_s"] = sum(BUFFER[k] * window[k] for k in BUFFER)
    return {"variant": variant, "prompts_per_request": P, "window": window}


# (seconds, steps, P, rows): several rates at P=8, then the same rate in larger requests
SHAPES = [(30, 4, 8, 96), (30, 8, 8, 240), (30, 14, 8, 480), (30, 12, 8, 900), (30, 14, 16, 480),
          (30, 14, 32, 480), (30, 14, 64, 448)]


def test_the_fit_recovers_the_costs_that_made_the_points():
    costs = _scale().fit_costs([_point("after", *s) for s in SHAPES])["after"]
    assert costs["points"] == len(SHAPES) and costs["sizes"] == [8, 16, 32, 64]
    assert costs["driver_s_per_s"] == pytest.approx(0.01, abs=1e-9)
    assert costs["driver_s_per_step"] == pytest.approx(0.030, abs=1e-9)
    assert costs["driver_s_per_request"] == pytest.approx(0.002, abs=1e-9)
    assert costs["driver_s_per_row"] == pytest.approx(0.0005, abs=1e-9)
    assert costs["buffer_s_per_s"] == pytest.approx(0.02, abs=1e-9)
    assert costs["buffer_s_per_request"] == pytest.approx(0.001, abs=1e-9)
    assert costs["buffer_s_per_row"] == pytest.approx(0.0002, abs=1e-9)


def test_one_request_size_cannot_tell_a_request_from_a_prompt():
    one_size = [_point("before", *s) for s in SHAPES if s[2] == 8]
    costs = _scale().fit_costs(one_size)["before"]
    assert costs["sizes"] == [8]
    assert costs["driver_s_per_row"] == 0.0 and costs["buffer_s_per_request"] == 0.0  # left out
    # the per-request term carries the per-prompt cost too: 2 ms + 8 x 0.5 ms
    assert costs["driver_s_per_request"] == pytest.approx(0.002 + 8 * 0.0005, abs=1e-9)
    assert costs["buffer_s_per_row"] == pytest.approx(0.0002 + 0.001 / 8, abs=1e-9)


def test_costs_are_never_negative():
    scale = _scale()
    # y = 4 - x is fitted best by a negative slope; a cost cannot be negative, so it is dropped
    assert scale.nonnegative_lstsq([[1, 1], [1, 2], [1, 3]], [3, 2, 1]) == pytest.approx([2.0, 0.0])
    assert scale.nonnegative_lstsq([[1, 0], [0, 1], [1, 1]], [1, 2, 3]) == pytest.approx([1.0, 2.0])


def test_the_ceilings_are_one_core_less_its_fixed_share_over_the_cost_per_pair():
    scale = _scale()
    costs = {"after": {"driver_s_per_s": 0.01, "driver_s_per_step": 0.030, "driver_s_per_request": 0.002,
                       "driver_s_per_row": 0.0005, "buffer_s_per_s": 0.02, "buffer_s_per_request": 0.001,
                       "buffer_s_per_row": 0.0002}}
    pred = scale.predict(costs, row_bytes=137e3)
    batch = scale.CLUSTER["batch"]
    for P in (8, 64):
        assert pred[f"driver_after_P{P}"] == pytest.approx(0.99 / (0.030 / batch + 0.002 / P + 0.0005))
        assert pred[f"buffer_actor_after_P{P}"] == pytest.approx(0.98 / (0.001 / P + 0.0002))
    # a fit from before the per-second and per-prompt terms (a saved --json) still predicts
    old = scale.predict({"old": {"driver_s_per_step": 0.030, "driver_s_per_request": 0.002,
                                 "buffer_s_per_s": 0.02, "buffer_s_per_row": 0.0002}}, row_bytes=137e3)
    assert old["driver_old_P8"] == pytest.approx(1 / (0.030 / batch + 0.002 / 8))


def test_a_part_with_no_per_unit_cost_fitted_has_no_ceiling_not_a_huge_one():
    scale = _scale()
    pred = scale.predict({"x": {"driver_s_per_s": 0.05, "driver_s_per_step": 0.0, "driver_s_per_request": 0.0,
                                "driver_s_per_row": 0.0, "buffer_s_per_s": 0.05, "buffer_s_per_request": 0.0,
                                "buffer_s_per_row": 1e-4}}, row_bytes=137e3)
    assert pred["driver_x_P8"] == float("inf")
    assert pred["buffer_actor_x_P8"] == pytest.approx(0.95 / 1e-4)
