"""Starting (or joining) the Ray cluster and creating the run's actors with declared resources."""

from __future__ import annotations

import os
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
        "max_logprobs": max(cfg.teacher.top_k_logprobs, 1),
        "max_model_len": cfg.data.max_prompt_tokens + max_new_tokens + 8,
        "seed": cfg.run.seed,
    }


def requested_resources(cfg: Config) -> dict[str, float]:
    """Total Ray resources the run's actors declare (CPU, GPU and custom node-type resources)."""
    need: dict[str, float] = {"CPU": 0.0, "GPU": 0.0}
    for n, section in ((cfg.teacher.num_replicas, cfg.teacher.engine),
                       (cfg.sampler.num_replicas, cfg.sampler.engine),
                       (cfg.learner.num_learners, cfg.learner)):
        for key, value in _options(section).items():
            if key == "resources":
                for name, amount in value.items():
                    need[name] = need.get(name, 0.0) + n * amount
            else:
                need[{"num_cpus": "CPU", "num_gpus": "GPU"}[key]] += n * value
    return need


def start_ray(cfg: Config) -> bool:
    """Join ``ray.address`` or start a local cluster; True if this call started it."""
    if ray.is_initialized():
        return False
    env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}}
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS") or None  # `ray job submit` sets it
    if address:
        ray.init(address=address, runtime_env=env, log_to_driver=False)
        return True
    os.environ.pop("RAY_ADDRESS", None)  # an empty value would make ray.init look for a cluster
    need = requested_resources(cfg)
    # Logical CPUs may exceed physical cores: actors share cores, each capped by its torch threads.
    cpus = cfg.ray.num_cpus or max(int(need["CPU"] + 0.999), os.cpu_count() or 1)
    ray.init(num_cpus=cpus, include_dashboard=cfg.ray.include_dashboard,
             dashboard_host=cfg.ray.dashboard_host, runtime_env=env, log_to_driver=False,
             configure_logging=False)
    return True


def check_resources(cfg: Config) -> None:
    """Fail fast, before any actor starts, when the cluster cannot hold the configured actors."""
    check_resources_for(requested_resources(cfg))


def check_resources_for(need: dict[str, float]) -> None:
    have = ray.cluster_resources()
    short = {k: (v, have.get(k, 0.0)) for k, v in need.items() if v > have.get(k, 0.0) + 1e-9}
    if short:
        detail = "; ".join(f"{k}: requested {v:g}, available {a:g}" for k, (v, a) in short.items())
        raise ResourceError(f"the cluster cannot place this run ({detail}); lower teacher/sampler "
                            "replicas, learner.num_learners or their num_cpus/num_gpus")


def _options(section) -> dict:
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


def create_actors(cfg: Config, teacher_path: str, student_path: str) -> RunActors:
    from actors.learner_group import LearnerGroup
    from actors.replay_buffer import ReplayBuffer
    from actors.student_sampler import StudentSampler
    from actors.teacher_pool import TeacherPool

    b, t, s = cfg.buffer, cfg.teacher, cfg.sampler
    buffer = ray.remote(ReplayBuffer).options(name="replay-buffer", num_cpus=0, max_concurrency=64).remote(
        b.capacity, b.max_policy_lag, b.sampling, cfg.run.seed)
    teachers = TeacherPool(
        t.num_replicas,
        _options(t.engine),
        model_path=teacher_path,
        backend=resolve_backend(t.engine.backend),
        engine_opts=engine_opts(t.engine, cfg, t.max_new_tokens),
        sampling={"max_new_tokens": t.max_new_tokens, "temperature": t.temperature, "top_p": t.top_p},
        top_k=t.top_k_logprobs,
        score_with=cfg.priming.score_with,
    )
    sampler_cls = ray.remote(StudentSampler)
    samplers = [
        sampler_cls.options(name=f"sampler-{i}", **_options(s.engine)).remote(
            i, student_path, resolve_backend(s.engine.backend), engine_opts(s.engine, cfg, s.max_new_tokens),
            {"max_new_tokens": s.max_new_tokens, "temperature": s.temperature, "top_p": s.top_p})
        for i in range(s.num_replicas)
    ]
    learners = LearnerGroup(cfg.learner.num_learners,
                            _options(cfg.learner),
                            student_path, cfg.learner, cfg.loss, cfg.run.seed)
    ray.get([buffer.ready.remote(), *teachers.ready_refs(), *[x.ready.remote() for x in samplers],
             *learners.ready_refs()])
    return RunActors(buffer, teachers, samplers, learners)
