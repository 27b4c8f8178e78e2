"""Starting (or joining) the Ray cluster and creating the run's actors with declared resources."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import ray

from actors.engines import resolve_backend
from driver.config import Config
from kd.errors import UserInputError


class ResourceError(UserInputError):
    pass


def engine_opts(ecfg, cfg: Config, max_new_tokens: int) -> dict:
    return {
        "dtype": cfg.models.dtype,
        "num_threads": ecfg.torch_threads,
        "kv_cache_gb": ecfg.kv_cache_gb,
        "gpu_memory_utilization": ecfg.gpu_memory_utilization,
        "max_logprobs": max(cfg.teacher.top_k_logprobs, 1),
        "max_model_len": cfg.data.max_prompt_tokens + max_new_tokens + 8,
        "seed": cfg.run.seed,
        # backend 'simulated' only (the others ignore it): a measuring instrument, see docs/scaling.md
        "simulated": {"tokens_per_s": ecfg.simulated.tokens_per_s, "latency_s": ecfg.simulated.latency_s,
                      "score_tokens_per_s": ecfg.simulated.score_tokens_per_s},
    }


def actor_demands(cfg: Config) -> list[tuple[str, dict[str, float]]]:
    """``(actor name, resources it needs on ONE node)`` for every teacher, sampler and learner."""
    out = []
    teachers = [("teacher" if t.name == "default" else f"teacher-{t.name}", t.num_replicas, t.engine)
                for t in cfg.teacher_pools()]
    for label, n, section in (*teachers, ("sampler", cfg.sampler.num_replicas, cfg.sampler.engine),
                              ("learner", cfg.learner.num_learners, cfg.learner)):
        demand = {"CPU": float(section.num_cpus), "GPU": float(section.num_gpus),
                  **{k: float(v) for k, v in section.resources.items()}}
        demand = {k: v for k, v in demand.items() if v > 0}
        out += [(f"{label}-{i}", demand) for i in range(n)]
    return out


def requested_resources(cfg: Config) -> dict[str, float]:
    """Total Ray resources the run's actors declare (CPU, GPU and custom node-type resources)."""
    need: dict[str, float] = {"CPU": 0.0, "GPU": 0.0}
    for _, demand in actor_demands(cfg):
        for key, amount in demand.items():
            need[key] = need.get(key, 0.0) + amount
    return need


def start_ray(cfg: Config) -> bool:
    """Join ``ray.address`` or start a local cluster; True if this call started it."""
    if ray.is_initialized():
        return False
    from kd.models import TRUST_REMOTE_CODE_ENV

    trust = "1" if cfg.models.trust_remote_code else "0"
    os.environ[TRUST_REMOTE_CODE_ENV] = trust  # the driver's own loads; actors get it below
    env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore",
                        TRUST_REMOTE_CODE_ENV: trust}}
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS") or None  # `ray job submit` sets it
    if address:
        ray.init(address=address, runtime_env=env, log_to_driver=False)
        return True
    os.environ.pop("RAY_ADDRESS", None)  # an empty value would make ray.init look for a cluster
    need = requested_resources(cfg)
    # Logical CPUs may exceed physical cores: actors share cores, each capped by its torch threads.
    cpus = cfg.ray.num_cpus or max(int(need["CPU"] + 0.999), os.cpu_count() or 1)
    # address="local": always a new cluster of our own; without it ray.init joins any cluster it finds
    # on the machine (a crashed run's leftover, another job's), which then refuses num_cpus
    ctx = ray.init(address="local", num_cpus=cpus, include_dashboard=cfg.ray.include_dashboard,
                   dashboard_host=cfg.ray.dashboard_host, runtime_env=env, log_to_driver=False,
                   configure_logging=False)
    if cfg.ray.include_dashboard and ctx.dashboard_url:
        print(dashboard_note(ctx.dashboard_url), file=sys.stderr)
    return True


def dashboard_note(url: str) -> str:
    """Where the dashboard is and, with Ray's token authentication on, how to get in. A new local
    cluster turns it on unless RAY_AUTH_MODE says otherwise (Ray 2.60 sets RAY_AUTH_MODE=token in
    this process when it does); the page then asks for the token and the API answers 401 without it."""
    note = f"raykd: Ray dashboard at http://{url.removeprefix('http://')}"
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "token":
        where = os.environ.get("RAY_AUTH_TOKEN_PATH") or "~/.ray/auth_token"
        if os.environ.get("RAY_AUTH_TOKEN"):
            where = "$RAY_AUTH_TOKEN"
        note += (f" (token authentication is on: paste the token `ray get-auth-token` prints, from {where}, into "
                 "its login page; API clients send 'Authorization: Bearer <token>'; docs/monitoring.md)")
    return note


def check_resources(cfg: Config, nodes: list[dict[str, float]] | None = None,
                    roles: tuple[str, ...] = ("teacher", "sampler", "learner")) -> None:
    """Fail fast, before any actor starts, when the cluster cannot hold the configured actors: in
    total, or because some actor fits on no single node, or because the actors cannot all be packed
    onto the nodes at once. ``nodes``: each node's total resources (default: the alive Ray nodes);
    ``roles``: which actors this command starts (``raykd generate`` starts only teachers)."""
    if nodes is None:
        nodes = [dict(n.get("Resources", {})) for n in ray.nodes() if n.get("Alive")]
    demands = [d for d in actor_demands(cfg) if d[0].split("-", 1)[0] in roles]
    problems = placement_problems(demands, nodes)
    if problems:
        raise ResourceError(f"the cluster cannot place this run: {'; '.join(problems)}; lower teacher/"
                            "sampler replicas, learner.num_learners or their num_cpus/num_gpus/resources, "
                            "or add nodes")


def placement_problems(demands: list[tuple[str, dict[str, float]]], nodes: list[dict[str, float]],
                       max_search: int = 200_000) -> list[str]:
    """Why ``demands`` (one bundle per actor, each on one node) cannot be placed on ``nodes`` (total
    resources per node); empty when they can, or when the search for a packing gives up undecided."""
    keys = sorted({k for _, d in demands for k in d})
    have = {k: sum(n.get(k, 0.0) for n in nodes) for k in keys}
    need = {k: sum(d.get(k, 0.0) for _, d in demands) for k in keys}
    short = [f"{k}: requested {need[k]:g}, available {have[k]:g}" for k in keys if need[k] > have[k] + 1e-9]
    if short:
        return short
    caps = [tuple(n.get(k, 0.0) for k in keys) for n in nodes]
    problems = []
    seen: set = set()
    for name, d in demands:
        want = tuple(d.get(k, 0.0) for k in keys)
        if want not in seen and not any(_fits(want, c) for c in caps):
            seen.add(want)
            largest = {k: max(c[i] for c in caps) if caps else 0.0 for i, k in enumerate(keys) if want[i] > 0}
            problems.append(f"{name} requests {_fmt(dict(zip(keys, want)), drop_zero=True)} on one node, "
                            f"available per node at most {_fmt(largest)} ({len(caps)} nodes)")
    if problems:
        return problems
    wants = sorted((tuple(d.get(k, 0.0) for k in keys) for _, d in demands), reverse=True)
    if _pack(wants, list(caps), max_search) is False:
        per_node = ", ".join(_fmt(dict(zip(keys, c))) for c in caps)
        return [f"{len(wants)} actors requesting {_fmt(need)} in all do not fit together on the nodes "
                f"({per_node}) although the totals do"]
    return []


def _fits(want: tuple, cap: tuple) -> bool:
    return all(w <= c + 1e-9 for w, c in zip(want, cap))


def _pack(wants: list[tuple], caps: list[tuple], budget: int) -> bool | None:
    """Depth-first search for a placement: True found, False none exists, None gave up."""
    steps = 0

    def place(i: int, start: int) -> bool | None:
        nonlocal steps
        if i == len(wants):
            return True
        tried: set = set()
        undecided = False
        # an actor identical to the previous one goes on the same or a later node (no mirror images)
        for j in range(start if i and wants[i] == wants[i - 1] else 0, len(caps)):
            if caps[j] in tried or not _fits(wants[i], caps[j]):
                continue
            tried.add(caps[j])
            steps += 1
            if steps > budget:
                return None
            old = caps[j]
            caps[j] = tuple(c - w for c, w in zip(old, wants[i]))
            found = place(i + 1, j)
            caps[j] = old
            if found:
                return True
            undecided |= found is None
        return None if undecided else False

    return place(0, 0)


def _fmt(res: dict, drop_zero: bool = False) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(res.items()) if v or not drop_zero) + "}"


def actor_options(section) -> dict:
    opts = {"num_cpus": section.num_cpus, "num_gpus": section.num_gpus}
    if section.resources:
        opts["resources"] = dict(section.resources)
    return opts


@dataclass
class RunActors:
    buffer: object
    teachers: object  # TeacherPool
    samplers: list
    learners: object  # LearnerGroup

    def all(self) -> list:
        return [self.buffer, *self.teachers.workers, *self.samplers, *self.learners.learners]

    def shutdown(self) -> None:
        for actor in self.all():
            ray.kill(actor, no_restart=True)
        if hasattr(self.learners, "shutdown"):
            self.learners.shutdown()  # also frees the learners' placement group


def make_learner_group(cfg: Config, student_path: str, name_prefix: str = "learner"):
    from actors.learner_group import LearnerGroup

    return LearnerGroup(cfg.learner.num_learners, actor_options(cfg.learner), student_path, cfg.learner,
                        cfg.loss, cfg.run.seed, placement_strategy=cfg.learner.placement_strategy,
                        name_prefix=name_prefix, max_new_tokens={"chosen": cfg.teacher.max_new_tokens,
                                                                 "rejected": cfg.sampler.max_new_tokens})


def make_teachers(cfg: Config, teacher_paths: dict[str, str], student_path: str | None = None,
                  text_pools=frozenset()):
    """One ``TeacherPool`` per teacher pool; several behind a ``MultiTeacherPool`` (driver/router.py
    put each request's pool name in its ``teacher`` key). The pools in ``text_pools`` have another
    tokenizer than the student at ``student_path``: the text path (docs/teachers.md)."""
    from actors.teacher_pool import MultiTeacherPool, TeacherPool

    pools = {}
    for t in cfg.teacher_pools():
        pools[t.name] = TeacherPool(
            t.num_replicas,
            actor_options(t.engine),
            model_path=teacher_paths[t.name],
            backend=resolve_backend(t.engine.backend),
            # room for the held-out evaluation's longer answers too (eval.teacher)
            engine_opts=engine_opts(t.engine, cfg, max(t.max_new_tokens, cfg.eval.max_new_tokens)),
            sampling={"max_new_tokens": t.max_new_tokens, "temperature": t.temperature, "top_p": t.top_p},
            top_k=t.top_k_logprobs,
            score_with=cfg.priming.score_with,
            name=t.name,
            student_tokenizer=student_path if t.name in text_pools else None,
        )
    return pools["default"] if list(pools) == ["default"] else MultiTeacherPool(pools)


def create_actors(cfg: Config, teacher_path: str | dict[str, str], student_path: str,
                  text_pools=frozenset()) -> RunActors:
    """``teacher_path``: the teacher's model dir, or each teacher pool's (``Prepared.pools()``);
    ``text_pools``: the pools on the text path (``Prepared.text_pools``)."""
    from actors.replay_buffer import ReplayBuffer
    from actors.student_sampler import StudentSampler
    from actors.lifecycle import register_run

    b, t, s = cfg.buffer, cfg.teacher, cfg.sampler
    simulated = [r for r, e in (("teacher", t.engine), ("sampler", s.engine)) if e.backend == "simulated"]
    if simulated:
        import sys

        print(f"raykd: {' and '.join(simulated)} engine backend 'simulated': no model, random tokens "
              "(a measuring instrument for the orchestration, docs/scaling.md)", file=sys.stderr)
    # Ray restarts a dead buffer (empty); the driver reloads it from the last checkpoint
    buffer = ray.remote(ReplayBuffer).options(name="replay-buffer", num_cpus=0, max_concurrency=64,
                                              max_restarts=-1).remote(
        b.capacity, b.max_policy_lag, b.sampling, cfg.run.seed, b.rows)
    teachers = make_teachers(cfg, teacher_path if isinstance(teacher_path, dict) else {"default": teacher_path},
                             student_path, text_pools)
    sampler_cls = ray.remote(StudentSampler)
    samplers = [
        sampler_cls.options(name=f"sampler-{i}", max_restarts=-1, **actor_options(s.engine)).remote(
            i, student_path, resolve_backend(s.engine.backend), engine_opts(s.engine, cfg, max(s.max_new_tokens, cfg.eval.max_new_tokens)),
            {"max_new_tokens": s.max_new_tokens, "temperature": s.temperature, "top_p": s.top_p})
        for i in range(s.num_replicas)
    ]
    learners = make_learner_group(cfg, student_path)
    # a lost node then fails fast in wait_alive, naming the actor that cannot come back
    register_run({**dict(zip(teachers.names, teachers.workers)),
                  **{f"sampler-{i}": x for i, x in enumerate(samplers)}},
                 lambda nodes, without=(): placement_problems(
                     [d for d in actor_demands(cfg) if d[0] not in without], nodes))
    ray.get([buffer.ready.remote(), *teachers.ready_refs(), *[x.ready.remote() for x in samplers],
             *learners.ready_refs()])
    return RunActors(buffer, teachers, samplers, learners)
