"""Prometheus metrics of a run, through ``ray.util.metrics`` (shown on the Ray dashboard's Metrics tab
and on each node's metrics endpoint; see docs/monitoring.md).

Every series has an ``actor`` tag naming who recorded it (``sampler-0``, ``teacher-1``,
``replay-buffer``, ``learner-group``). Ray prefixes exported names with ``ray_``: the counter
``raykd_samples_generated_total`` is scraped as ``ray_raykd_samples_generated_total``.

==================================  =========  ==========================================================
name                                kind       recorded by
==================================  =========  ==========================================================
raykd_samples_generated_total       Counter    samplers (student responses), teachers (teacher responses)
raykd_tokens_per_second             Gauge      samplers, teachers: generated tokens / seconds, last call
raykd_buffer_size                   Gauge      the replay buffer: rows held, after every add/sample
raykd_buffer_capacity               Gauge      the replay buffer: rows it holds at most (buffer.capacity)
raykd_learner_loss                  Gauge      the driver, per step (``record_step``)
raykd_policy_lag                    Gauge      the driver, per step: versions between sampling and training
raykd_weight_sync_seconds           Gauge      the driver, per step: duration of the last weight sync
raykd_<health metric>               Gauge      the driver, per step: the ``kd.health`` metrics of the row
                                               (``HEALTH_GAUGES``: metrics.jsonl key -> metric name)
==================================  =========  ==========================================================

Metric objects are created lazily, once per process, on first use. Every function here is safe to call
outside Ray or where metrics are unavailable: it then does nothing (and never raises), so recording a
metric can never break the actor that records it.
"""

from __future__ import annotations

import logging
import math

logger = logging.getLogger(__name__)

_DEFS = {
    "raykd_samples_generated_total": ("counter", "Responses generated (student samples or teacher responses)"),
    "raykd_tokens_per_second": ("gauge", "Generated tokens per second of generation time, last call"),
    "raykd_buffer_size": ("gauge", "Rows held in the replay buffer"),
    "raykd_buffer_capacity": ("gauge", "Rows the replay buffer holds at most"),
    "raykd_learner_loss": ("gauge", "Training loss of the last learner step"),
    "raykd_policy_lag": ("gauge", "Policy versions between sampling and training, last step"),
    "raykd_weight_sync_seconds": ("gauge", "Seconds the last weight sync to the samplers took"),
}
# distillation health (kd.health), per step: metrics.jsonl key -> (gauge name, description)
_HEALTH = {
    "teacher_topk_mass": ("raykd_teacher_topk_mass", "Teacher probability mass covered by the stored top-k"),
    "top1_agreement": ("raykd_top1_agreement", "Share of trained tokens where student and teacher top-1 agree"),
    "topk_overlap": ("raykd_topk_overlap", "Overlap of student and teacher top-k on trained tokens, / k"),
    "student_entropy": ("raykd_student_entropy", "Student entropy on trained tokens, nats"),
    "y_t_len": ("raykd_y_t_length", "Mean length of the teacher's responses y_t, tokens"),
    "y_s_len": ("raykd_y_s_length", "Mean length of the student's responses y_s, tokens"),
    "y_t_truncated": ("raykd_y_t_truncated_ratio", "Share of y_t that hit teacher.max_new_tokens"),
    "y_s_truncated": ("raykd_y_s_truncated_ratio", "Share of y_s that hit sampler.max_new_tokens"),
    "y_t_exact_match": ("raykd_y_t_exact_match", "Exact match of y_t against the training prompts' references"),
    "y_s_exact_match": ("raykd_y_s_exact_match", "Exact match of y_s against the training prompts' references"),
}
HEALTH_GAUGES = {key: name for key, (name, _) in _HEALTH.items()}
_DEFS.update({name: ("gauge", desc) for name, desc in _HEALTH.values()})
NAMES = tuple(_DEFS)

_metrics: dict | None = None  # name -> ray metric object; {} once metrics turned out unavailable
_session: str | None = None  # the Ray node the objects were made under (a driver may re-init Ray)


def _get(name: str):
    global _metrics, _session
    session = None
    try:
        import ray

        if not ray.is_initialized():
            return None  # not yet: try again once Ray is up
        session = ray.get_runtime_context().get_node_id()
        if _metrics is None or session != _session:
            from ray.util import metrics as rm

            kinds = {"counter": rm.Counter, "gauge": rm.Gauge}
            _metrics = {n: kinds[kind](n, description=desc, tag_keys=("actor",))
                        for n, (kind, desc) in _DEFS.items()}
            _session = session
    except Exception as e:  # metrics are optional; never break the caller
        if _metrics is None:
            logger.warning("raykd metrics unavailable: %s", e)
        _metrics, _session = {}, session
    return _metrics.get(name)


def _valid(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def set_gauge(name: str, value, actor: str) -> None:
    """Set gauge ``name`` for ``actor``; None/NaN values are skipped."""
    metric = _get(name)
    if metric is None or not _valid(value):
        return
    try:
        metric.set(float(value), tags={"actor": actor})
    except Exception as e:
        logger.debug("could not record %s: %s", name, e)


def inc_counter(name: str, value, actor: str) -> None:
    metric = _get(name)
    if metric is None or not _valid(value) or value <= 0:
        return
    try:
        metric.inc(float(value), tags={"actor": actor})
    except Exception as e:
        logger.debug("could not record %s: %s", name, e)


def record_generation(actor: str, num_responses: int, num_tokens: int, seconds: float) -> None:
    """A sampler's or teacher's generate call: responses counted, tokens/s of the call."""
    inc_counter("raykd_samples_generated_total", num_responses, actor)
    if seconds > 0:
        set_gauge("raykd_tokens_per_second", num_tokens / seconds, actor)


def record_buffer(size: int, actor: str = "replay-buffer", capacity: int | None = None) -> None:
    set_gauge("raykd_buffer_size", size, actor)
    if capacity is not None:
        set_gauge("raykd_buffer_capacity", capacity, actor)


def record_step(row: dict, actor: str = "learner-group") -> None:
    """The driver's per-step metrics row (metrics.jsonl): loss, policy lag, last weight-sync time, and
    the health metrics the row has."""
    set_gauge("raykd_learner_loss", row.get("loss"), actor)
    set_gauge("raykd_policy_lag", row.get("policy_lag"), actor)
    set_gauge("raykd_weight_sync_seconds", row.get("weight_sync_s"), actor)
    for key, name in HEALTH_GAUGES.items():
        set_gauge(name, row.get(key), actor)
