"""Which teacher pool answers each prompt (``teachers:`` + ``route:``; docs/teachers.md).

``route.field``: the prompt row's field names the teacher (checked row by row when the prompts are
read, ``kd.data.rows_to_records``). ``route.weights``: a random mix, fixed per prompt by (run.seed,
prompt id), so a resumed or repeated run routes every prompt the same way.
"""

from __future__ import annotations

import random

from driver.config import Config


def route_spec(cfg: Config) -> tuple[str, list[str]] | None:
    """What ``kd.data.load_prompts`` checks every row against: (field, teacher names), or None."""
    if cfg.teachers and cfg.route.field is not None:
        return cfg.route.field, [t.name for t in cfg.teachers]
    return None


def teacher_for(cfg: Config, prompt_id: str, routed: str | None) -> str:
    """The name of the teacher pool that answers the prompt ``prompt_id`` (``routed``: its field value)."""
    pools = cfg.teacher_pools()
    if len(pools) == 1 and not cfg.route.weights and cfg.route.field is None:
        return pools[0].name
    if cfg.route.field is not None:
        return routed
    names = list(cfg.route.weights)
    rng = random.Random(f"{cfg.run.seed}:{prompt_id}")
    return rng.choices(names, weights=[cfg.route.weights[n] for n in names])[0]
