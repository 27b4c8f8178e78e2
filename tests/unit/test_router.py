"""Routing prompts to teacher pools: the config's checks, the row-by-row field check, the weighted mix."""

import json
from collections import Counter

import pyarrow as pa
import pytest

from driver.config import ConfigError, load_config
from driver.router import route_spec, teacher_for
from kd.data import BUFFER_SCHEMA, DataError, load_prompts, with_teacher_name

TWO = ["teachers=[{name: math}, {name: code}]"]


def test_single_teacher_config_is_one_pool_named_default():
    cfg = load_config(None, ["teacher.num_replicas=2", "models.teacher=tiny"], check_files=False)
    (pool,) = cfg.teacher_pools()
    assert (pool.name, pool.model, pool.num_replicas) == ("default", "tiny", 2)
    assert teacher_for(cfg, "p0", None) == "default" and route_spec(cfg) is None


@pytest.mark.parametrize("overrides, message", [
    (["teachers=[{name: a}, {name: a}]", "route.weights={a: 1}"], "teachers[1].name='a': duplicate teacher name"),
    ([*TWO, "route.weights={math: 1, chem: 1}"], "route.weights.chem=1.0: unknown teacher (teachers: math, code)"),
    (TWO, "several teachers (math, code) need route.field or route.weights"),
    (["route.field=task"], "needs a `teachers:` list"),
    ([*TWO, "route.field=task", "route.weights={math: 1}"], "not both"),
    ([*TWO, "route.field=task", "buffer.rows=object_store"], "several teachers need buffer.rows=actor"),
    (["teachers=[{name: 'a b'}]"], "teachers[0].name='a b'"),
    # every field a single teacher's section checks is checked in each pool too, under its own name
    (["teachers=[{name: m, top_k_logprobs: -1}]"], "teachers[0].top_k_logprobs=-1: must be >= 0"),
    (["teachers=[{name: m, engine: {kv_cache_gb: -1}}]"], "teachers[0].engine.kv_cache_gb=-1"),
    (["teachers=[{name: m, engine: {torch_threads: 0}}]"], "teachers[0].engine.torch_threads=0: must be a positive"),
    (["teacher.engine.gpu_memory_utilization=0"], "teacher.engine.gpu_memory_utilization=0"),
    (["sampler.engine.num_cpus=-2"], "sampler.engine.num_cpus=-2"),
])
def test_bad_teacher_configs_fail_with_one_line_naming_the_field(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides, check_files=False)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_named_pool_defaults_to_models_teacher_and_keeps_its_own_settings():
    cfg = load_config(None, ["models.teacher=tiny", "teachers=[{name: m, num_replicas: 3}, {name: c, model: x}]",
                             "route.weights={m: 1, c: 1}"], check_files=False)
    assert [(p.name, p.model, p.num_replicas) for p in cfg.teacher_pools()] == [("m", "tiny", 3), ("c", "x", 1)]


def _write(tmp_path, rows):
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_route_field_reads_each_rows_teacher_and_fails_on_a_row_without_one(tmp_path):
    good = _write(tmp_path, [{"question": "a?", "task": "math"}, {"question": "b?", "task": "code"}])
    recs = load_prompts(good, "question", None, 0, 0, ("task", ["math", "code"]))
    assert [r.route for r in recs] == ["math", "code"]
    bad = _write(tmp_path, [{"question": "a?", "task": "math"}, {"question": "b?"}, {"question": "c?", "task": "x"}])
    with pytest.raises(DataError, match=r"p\.jsonl:2: field 'task' \(route\.field\) is missing"):
        load_prompts(bad, "question", None, 0, 0, ("task", ["math", "code"]))
    bad = _write(tmp_path, [{"question": "c?", "task": "chem"}])
    with pytest.raises(DataError, match=r"p\.jsonl:1: field 'task' \(route\.field\) is 'chem'; it must name a teacher"):
        load_prompts(bad, "question", None, 0, 0, ("task", ["math", "code"]))


def test_weighted_routing_is_seeded_per_prompt_and_follows_the_weights():
    cfg = load_config(None, [*TWO, "route.weights={math: 0.7, code: 0.3}"], check_files=False)
    picks = [teacher_for(cfg, f"p{i}", None) for i in range(4000)]
    assert picks == [teacher_for(cfg, f"p{i}", None) for i in range(4000)]  # the same on a rerun
    share = Counter(picks)["math"] / len(picks)
    assert abs(share - 0.7) < 4 * (0.7 * 0.3 / 4000) ** 0.5  # within 4 standard errors of 0.7
    other = load_config(None, [*TWO, "route.weights={math: 0.7, code: 0.3}", "run.seed=1"], check_files=False)
    assert picks != [teacher_for(other, f"p{i}", None) for i in range(4000)]


def test_rows_from_before_teacher_name_load_with_a_null_one():
    old = pa.schema([f for f in BUFFER_SCHEMA if f.name != "teacher_name"])
    assert with_teacher_name(old.empty_table()).schema.field("teacher_name").type == pa.string()
    row = {n: None for n in old.names}
    t = with_teacher_name(pa.Table.from_pylist([row], schema=old))
    assert t.column("teacher_name").to_pylist() == [None]
    assert with_teacher_name(t) is t


def test_the_run_summary_shows_each_teachers_pairs_only_with_several():
    from driver.monitoring import format_summary

    text = format_summary({"pairs_added": 36, "pairs_by_teacher": {"math": 29, "code": 7}})
    assert "pairs        36 added; by teacher: math 29, code 7" in text
    assert "by teacher" not in format_summary({"pairs_added": 36, "pairs_by_teacher": {"default": 36}})
