"""The run configuration: one tree of typed dataclasses, loaded from YAML with ``--set`` overrides.

Defaults live only here. Every field is checked before any actor starts; an error is one line that
names the dotted field, the bad value and what is allowed (``ConfigError``).
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml

from kd.errors import UserInputError

from kd.losses import DIVERGENCES, LOSS_TYPES, TOPK_TAILS
from kd.objective import loss_needs, resolve_loss
from kd.priming import STRATEGIES


class ConfigError(UserInputError):
    """A bad configuration value; the message is one line naming the dotted field."""


@dataclass
class RunConfig:
    name: str = "raykd"
    runs_dir: str = "runs"
    seed: int = 0
    # experiment trackers that get every metrics.jsonl row, the config and the summary (driver/trackers.py)
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = field(default_factory=list)


@dataclass
class ModelsConfig:
    teacher: str = "smollm2-135m-instruct"  # an HF dir, 'smollm2-135m-instruct' or 'tiny[:L[:SEED]]'
    student: str | None = None  # an HF dir or spec; None = truncated copy of the teacher
    # layers of the teacher kept in the student (used when models.student is None); the default
    # suits the default teacher's 30 layers
    student_keep_layers: list[int] | None = field(default_factory=lambda: [0, 7, 14, 21, 29])
    # with the truncated student: keep only the first N ids of the teacher's BPE vocabulary (its
    # special tokens, bytes and first merges; embedding and head rows likewise). A smaller student
    # with another tokenizer, so the run takes the text path (docs/teachers.md)
    student_vocab_size: int | None = None
    cache_dir: str | None = None  # default ~/.cache/raykd (or $RAYKD_CACHE)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = False  # run model code shipped with a checkpoint (only for models you trust)


@dataclass
class DataConfig:
    # 'synthetic_math', a .jsonl / .parquet file, or 'hf:NAME[:CONFIG]:SPLIT' (Hugging Face datasets:
    # a hub name when online, or a directory written by Dataset.save_to_disk)
    source: str = "synthetic_math"
    prompt_field: str = "question"
    answer_field: str | None = "answer"
    num_prompts: int = 256  # synthetic_math only: how many problems to generate
    max_prompt_tokens: int = 256
    on_overlong: Literal["truncate", "skip", "error"] = "skip"
    system_prompt: str | None = "Solve the math problem step by step, then give the final number."
    chat_template: bool = True


@dataclass
class PrimingConfig:
    strategy: str = "none"
    template: str | None = None  # custom instruction; '{answer}' is filled for answer_hint
    # reference: the paper's reference-code instructions, prepended to the question (its placement);
    # raykd: raykd's earlier paraphrases. See docs/priming.md.
    wording: Literal["reference", "raykd"] = "reference"
    placement: Literal["prepend", "append"] = "prepend"
    score_with: Literal["primed", "plain"] = "primed"


@dataclass
class SimulatedEngineConfig:
    """``backend: simulated`` only: no model, outputs of the configured shapes after this delay (a
    measuring instrument for the orchestration: docs/scaling.md)."""

    tokens_per_s: float = 2000.0  # one replica's generation rate, over a whole call's batch
    score_tokens_per_s: float = 20000.0  # one replica's teacher-forced scoring rate
    latency_s: float = 0.05  # fixed cost per call


@dataclass
class EngineConfig:
    # auto: vLLM wherever it is installed. simulated: no model (random tokens of realistic shapes and
    # timing, docs/scaling.md); never a default, never what auto picks
    backend: Literal["auto", "hf", "vllm", "simulated"] = "auto"
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    resources: dict[str, float] = field(default_factory=dict)  # custom Ray resources (node types)
    torch_threads: int = 1  # CPU threads of the engine (vLLM on CPU too)
    kv_cache_gb: float = 0.5  # vLLM on CPU: KV-cache size (GPU: gpu_memory_utilization)
    gpu_memory_utilization: float = 0.5  # vLLM on GPU
    simulated: SimulatedEngineConfig = field(default_factory=SimulatedEngineConfig)


@dataclass
class TeacherConfig:
    num_replicas: int = 1
    max_new_tokens: int = 64
    temperature: float = 0.7
    top_p: float = 1.0
    top_k_logprobs: int = 8  # teacher top-k stored per position (for token-level losses)
    engine: EngineConfig = field(default_factory=EngineConfig)


@dataclass
class NamedTeacherConfig(TeacherConfig):
    """One entry of ``teachers:``: a named teacher pool with its own model (several teachers, routed
    by ``route``; docs/teachers.md)."""

    name: str = ""
    model: str | None = None  # an HF dir or spec, as models.teacher; None: models.teacher


@dataclass
class RouteConfig:
    """Which teacher of ``teachers:`` answers a prompt: ``field`` (a prompt row's field whose value is
    a teacher's name) or ``weights`` (teacher name -> weight, a seeded random mix)."""

    field: str | None = None
    weights: dict[str, float] = dataclasses.field(default_factory=dict)


@dataclass
class SamplerConfig:
    num_replicas: int = 1
    prompts_per_request: int = 8
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    max_in_flight: int = 2  # producer requests outstanding per sampler (bounds policy lag)
    # the producers take no new prompts while the buffer's untrained rows plus the prompts in flight
    # cover this many learner steps (learner.batch_size rows each): they stay about one batch ahead of
    # the learner instead of filling the buffer with rows that go stale, and leave it the machine's CPU
    # (0: no bound but buffer.capacity). auto: 1 + ceil(request latency / learner step), measured as
    # the run goes (Little's law: enough prompts in flight to cover the learner while a request is
    # answered), at least 2 and at most buffer.max_policy_lag x sync.every_steps: for producers on
    # their own devices (1.37x of 2 with simulated producers). Where they share the learner's CPU
    # cores it made the quickstart's online phase slower (0.83x here: the extra work in flight slowed
    # the learner's own step), so 2 is the default (docs/benchmarks.md, benchmarks/pacing.py)
    max_steps_ahead: int | Literal["auto"] = 2
    engine: EngineConfig = field(default_factory=EngineConfig)


@dataclass
class BufferConfig:
    capacity: int = 4096
    max_policy_lag: int = 2
    sampling: Literal["fifo", "uniform"] = "fifo"
    min_size_to_train: int = 8
    # actor: rows pass through the replay-buffer actor; object_store: they stay where the teachers
    # put them, the actor keeps a stub per row and learners fetch the rows (docs/scaling.md)
    rows: Literal["actor", "object_store"] = "actor"


@dataclass
class LoraConfig:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass
class LearnerConfig:
    num_learners: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    resources: dict[str, float] = field(default_factory=dict)  # custom Ray resources (node types)
    torch_threads: int = 1
    # threads during offline phases, when no teacher or sampler is working: "auto" (each rank's share
    # of its node's CPUs: the idle engines' cores too), a number, or 0 (torch_threads)
    offline_torch_threads: int | Literal["auto"] = "auto"
    zero_stage: int = 0
    batch_size: int = 8
    lr: float = 5e-5
    weight_decay: float = 0.0
    warmup_steps: int = 0
    grad_clip: float = 1.0
    max_steps: int = 20  # the run's length when there is no schedule (a schedule sets its phases' steps)
    grad_accum_steps: int = 1
    max_restarts: int = 2  # a dead learner rank: restart the group from the last checkpoint this often
    bf16: Literal["auto", "on", "off"] = "auto"  # auto: on where the device supports it (GPU)
    placement_strategy: Literal["PACK", "SPREAD"] = "PACK"
    lora: LoraConfig | None = None  # LoRA through peft; samplers receive merged weights
    deepspeed_config: str | None = None  # a DeepSpeed JSON passed through (overrides the above)


@dataclass
class LossConfig:
    """loss = kd_coef * (the method's term) + sft_coef * CE(y_t). None: the method's default from
    ``kd.objective.METHOD_DEFAULTS``, filled in by ``validate`` (docs/losses.md has the table)."""

    RENAMED: ClassVar[dict[str, str]] = {
        "lm_coef": "renamed to sft_coef, the weight of cross-entropy on the teacher's response y_t (the "
                   "distillation term has its own weight, kd_coef; see docs/losses.md)",
    }

    type: str = "dpkd"
    kd_coef: float | None = None  # weight of the distillation term (loss.type's own)
    sft_coef: float | None = None  # weight of cross-entropy on the teacher's response y_t
    # divergences only: probability that a row's divergence is on the student's sample y_s, else on y_t
    student_ratio: float | None = None
    beta: float = 0.1
    label_smoothing: float = 0.0
    length_normalize: bool = True
    temperature: float = 1.0
    jsd_beta: float = 0.5
    skew_alpha: float = 0.1
    # divergences on a top-k teacher: its mass outside the top-k spread evenly over the other ids
    # ("uniform", a full-vocabulary divergence) or lumped into one outcome ("bucket"); docs/losses.md
    topk_tail: str = "uniform"


@dataclass
class PhaseConfig:
    """One phase of a run's schedule: e.g. offline SeqKD for 200 steps, then online DPKD for 500."""

    kind: Literal["online", "offline"] = "online"
    steps: int = 0
    # offline: a dataset directory written by `raykd generate`; unset: the run generates it first, with
    # its own teacher pool, prompts and priming, into RUN_DIR/teacher-data (resumable)
    data: str | None = None
    loss: LossConfig | None = None  # this phase's loss (default: the top-level `loss`)
    # this phase's peak learning rate (default: learner.lr); the warm-up of learner.warmup_steps
    # still counts the run's steps, so a phase after it trains at this rate from its first step
    lr: float | None = None
    # online: take y_t (its tokens, the teacher's log-probs and top-k) from a teacher dataset instead of
    # generating it: a `raykd generate` directory, or "offline" for the dataset of the last offline phase
    # before this one (its `data`, or the run's own teacher-data). Prompts the dataset lacks are generated;
    # the teacher still scores the student's samples. None: the teacher generates y_t for every prompt
    teacher_answers: str | None = None


@dataclass
class SyncConfig:
    every_steps: int = 2
    # object_store: rank 0's weights go into the Ray object store once, every sampler loads them;
    # broadcast: a process group between rank 0 and the samplers (NCCL on GPU), in buckets
    mode: Literal["object_store", "broadcast"] = "object_store"
    bucket_mb: int = 256


@dataclass
class CheckpointConfig:
    every_steps: int = 0  # 0: only at the end of the run
    keep_last: int = 2
    export_hf: bool = True  # also write the student in Hugging Face format with each checkpoint


@dataclass
class EvalConfig:
    every_steps: int = 0  # 0: no periodic evaluation during training
    source: str = "synthetic_math"  # held-out prompts: 'synthetic_math' (its own seed) or a file
    prompt_field: str = "question"
    answer_field: str = "answer"
    limit: int = 32
    max_new_tokens: int = 128
    seeds: list[int] = field(default_factory=list)  # empty: greedy; else sample once per seed
    # score the student on these held-out prompts before training and after it (summary.json:
    # eval_before / eval_after), and the teacher once on the same prompts (eval_teacher)
    before_after: bool = False
    teacher: bool = False


@dataclass
class RayConfig:
    address: str | None = None  # None: start a local cluster
    num_cpus: int | None = None  # local cluster only; default: enough for the configured actors
    dashboard_host: str = "127.0.0.1"
    include_dashboard: bool = False


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    priming: PrimingConfig = field(default_factory=PrimingConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    # several teacher pools (empty: the one of models.teacher + teacher, named 'default')
    teachers: list[NamedTeacherConfig] = field(default_factory=list)
    route: RouteConfig = field(default_factory=RouteConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    buffer: BufferConfig = field(default_factory=BufferConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    schedule: list[PhaseConfig] = field(default_factory=list)  # empty: online for learner.max_steps
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def phases(self) -> list[PhaseConfig]:
        """The schedule with every phase's loss filled in."""
        phases = self.schedule or [PhaseConfig(kind="online", steps=self.learner.max_steps)]
        return [dataclasses.replace(p, loss=p.loss or self.loss, lr=p.lr or self.learner.lr) for p in phases]

    def teacher_pools(self) -> list[NamedTeacherConfig]:
        """Every teacher pool, named; the single-teacher config is one pool named 'default'."""
        if self.teachers:
            return [dataclasses.replace(t, model=t.model or self.models.teacher) for t in self.teachers]
        return [NamedTeacherConfig(**dataclasses.asdict(self.teacher) | {"engine": self.teacher.engine},
                                   name="default", model=self.models.teacher)]

    def total_steps(self) -> int:
        return sum(p.steps for p in self.phases())


# ---------------------------------------------------------------------------------------------
# Building a typed tree from plain data
# ---------------------------------------------------------------------------------------------


def _coerce(value: Any, tp: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, path)
            except ConfigError as e:
                errors.append(e)
        if len(errors) > 1:  # each alternative's complaint, e.g. "expected an integer, or must be one of 'auto'"
            prefix = f"{path}={value!r}: "
            raise ConfigError(prefix + ", or ".join(str(e).removeprefix(prefix) for e in errors))
        raise errors[0] if errors else ConfigError(f"{path}={value!r}: expected {tp}")
    if origin is Literal:
        if value not in args:
            allowed = ", ".join(repr(a) for a in args)
            raise ConfigError(f"{path}={value!r}: must be one of {allowed}")
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}={value!r}: expected a mapping")
        return {_coerce(k, args[0], path): _coerce(v, args[1], f"{path}.{k}") for k, v in value.items()}
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path}={value!r}: expected a list")
        return [_coerce(v, args[0], f"{path}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}={value!r}: expected true or false")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}={value!r}: expected an integer")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads '3e-4' (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}={value!r}: expected a number")
        if not math.isfinite(value):
            raise ConfigError(f"{path}={value!r}: must be a finite number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}={value!r}: expected a string")
        return value
    raise ConfigError(f"{path}: unsupported field type {tp}")


def _build(cls, data: Any, path: str):
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'}={data!r}: expected a mapping")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    renamed = getattr(cls, "RENAMED", {})
    for key in data:
        if key not in names:
            where = f"{path}.{key}" if path else key
            if key in renamed:
                raise ConfigError(f"{where}: {renamed[key]}")
            raise ConfigError(f"{where}: unknown key (allowed: {', '.join(sorted(names))})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            kwargs[f.name] = _coerce(data[f.name], hints[f.name], f"{path}.{f.name}" if path else f.name)
    return cls(**kwargs)


# ---------------------------------------------------------------------------------------------
# Semantic checks (ranges, names) that types alone cannot express
# ---------------------------------------------------------------------------------------------


def _check(cond: bool, path: str, value: Any, allowed: str) -> None:
    if not cond:
        raise ConfigError(f"{path}={value!r}: {allowed}")


def validate(cfg: Config) -> Config:
    positive_ints = {
        "data.num_prompts": cfg.data.num_prompts,
        "data.max_prompt_tokens": cfg.data.max_prompt_tokens,
        "sampler.num_replicas": cfg.sampler.num_replicas,
        "sampler.prompts_per_request": cfg.sampler.prompts_per_request,
        "sampler.max_new_tokens": cfg.sampler.max_new_tokens,
        "sampler.max_in_flight": cfg.sampler.max_in_flight,
        "buffer.capacity": cfg.buffer.capacity,
        "buffer.min_size_to_train": cfg.buffer.min_size_to_train,
        "learner.num_learners": cfg.learner.num_learners,
        "learner.batch_size": cfg.learner.batch_size,
        "learner.max_steps": cfg.learner.max_steps,
        "learner.torch_threads": cfg.learner.torch_threads,
        "sync.every_steps": cfg.sync.every_steps,
        "sync.bucket_mb": cfg.sync.bucket_mb,
        "learner.grad_accum_steps": cfg.learner.grad_accum_steps,
        "checkpoint.keep_last": cfg.checkpoint.keep_last,
        "eval.limit": cfg.eval.limit,
        "eval.max_new_tokens": cfg.eval.max_new_tokens,
    }
    _check(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", cfg.run.name) is not None, "run.name", cfg.run.name,
           "letters, digits, '.', '_' and '-' only (it names a directory under run.runs_dir)")
    for path, v in positive_ints.items():
        _check(v > 0, path, v, "must be a positive integer")
    non_negative = {
        "buffer.max_policy_lag": cfg.buffer.max_policy_lag,
        "learner.warmup_steps": cfg.learner.warmup_steps,
        "learner.offline_torch_threads": (0 if cfg.learner.offline_torch_threads == "auto"
                                          else cfg.learner.offline_torch_threads),
        "learner.max_restarts": cfg.learner.max_restarts,
        "learner.weight_decay": cfg.learner.weight_decay,
        "learner.num_cpus": cfg.learner.num_cpus,
        "learner.num_gpus": cfg.learner.num_gpus,
        "sampler.temperature": cfg.sampler.temperature,
        "learner.grad_clip": cfg.learner.grad_clip,
        "checkpoint.every_steps": cfg.checkpoint.every_steps,
        "eval.every_steps": cfg.eval.every_steps,
    }
    for path, v in non_negative.items():
        _check(v >= 0, path, v, "must be >= 0")
    _check(cfg.learner.lr > 0, "learner.lr", cfg.learner.lr, "must be > 0")
    cfg.loss = _check_loss(cfg.loss, "loss")
    _check_teacher_pool(cfg.teacher, "teacher")
    _check_engine(cfg.sampler.engine, "sampler.engine")
    _check(0 < cfg.sampler.top_p <= 1, "sampler.top_p", cfg.sampler.top_p, "must be in (0, 1]")
    _check(cfg.learner.zero_stage in (0, 1, 2, 3), "learner.zero_stage", cfg.learner.zero_stage,
           "must be one of 0, 1, 2, 3")
    _check(cfg.priming.strategy in STRATEGIES, "priming.strategy", cfg.priming.strategy,
           f"must be one of {', '.join(STRATEGIES)}")
    _check(cfg.buffer.min_size_to_train <= cfg.buffer.capacity, "buffer.min_size_to_train",
           cfg.buffer.min_size_to_train, f"must be <= buffer.capacity ({cfg.buffer.capacity})")
    _check(cfg.learner.batch_size <= cfg.buffer.capacity, "learner.batch_size",
           cfg.learner.batch_size, f"must be <= buffer.capacity ({cfg.buffer.capacity})")
    ahead = cfg.sampler.max_steps_ahead
    _check(ahead == "auto" or ahead >= 0, "sampler.max_steps_ahead", ahead,
           "must be >= 0 (0: no bound but buffer.capacity) or 'auto'")
    _check(ahead in ("auto", 0) or ahead * cfg.learner.batch_size >= cfg.buffer.min_size_to_train,
           "sampler.max_steps_ahead",
           ahead, f"x learner.batch_size ({cfg.learner.batch_size}) must reach buffer.min_size_to_train "
           f"({cfg.buffer.min_size_to_train}), or the learner waits for rows the producers never make")
    _check(cfg.learner.batch_size % cfg.learner.num_learners == 0, "learner.batch_size",
           cfg.learner.batch_size, f"must be divisible by learner.num_learners ({cfg.learner.num_learners})")
    if cfg.models.student is None and cfg.models.student_keep_layers is None:
        raise ConfigError("models.student=None: set models.student or models.student_keep_layers")
    if cfg.models.student_vocab_size is not None:
        _check(cfg.models.student is None, "models.student_vocab_size", cfg.models.student_vocab_size,
               f"trims the truncated student, but models.student={cfg.models.student!r} is given; unset one")
        _check(cfg.models.student_vocab_size > 0, "models.student_vocab_size", cfg.models.student_vocab_size,
               "must be a positive integer")
    src = cfg.data.source
    if src != "synthetic_math" and not src.startswith("hf:"):
        _check(src.endswith((".jsonl", ".json", ".parquet")), "data.source", src,
               "must be 'synthetic_math', a .jsonl/.parquet file or hf:NAME[:CONFIG]:SPLIT")
    for i, ph in enumerate(cfg.schedule):
        where = f"schedule[{i}]"
        _check(ph.steps > 0, f"{where}.steps", ph.steps, "must be a positive integer")
        if ph.lr is not None:
            _check(ph.lr > 0, f"{where}.lr", ph.lr, "must be > 0")
            _check(cfg.learner.deepspeed_config is None, f"{where}.lr", ph.lr,
                   "cannot be combined with learner.deepspeed_config (its optimizer and scheduler set the "
                   "rate); remove one")
        if ph.loss is not None:
            ph.loss = _check_loss(ph.loss, f"{where}.loss")
        loss = ph.loss or cfg.loss
        if ph.kind == "offline":
            _check(loss.type not in ("dpkd", "pg_rkl"), f"{where}.loss.type", loss.type,
                   "needs the student's responses, which offline data has none of (use sft, fkl, ... "
                   "or an online phase)")
            if loss.type in DIVERGENCES:
                _check(loss.student_ratio == 0, f"{where}.loss.student_ratio", loss.student_ratio,
                       "an offline phase has no student samples: set it to 0 (the divergence on the "
                       "teacher's text) or use an online phase")
        else:
            _check(ph.data is None, f"{where}.data", ph.data, "online phases sample their own data")
        _check_teacher_answers(cfg, i, ph, loss)
    if cfg.learner.bf16 == "on":
        _check(cfg.learner.num_gpus > 0, "learner.bf16", "on", "needs learner.num_gpus > 0 (bf16 here is GPU-only)")
    if cfg.learner.lora is not None:
        _check(cfg.learner.lora.r > 0, "learner.lora.r", cfg.learner.lora.r, "must be a positive integer")
        _check(bool(cfg.learner.lora.target_modules), "learner.lora.target_modules",
               cfg.learner.lora.target_modules, "must name at least one module")
    if cfg.eval.source != "synthetic_math":
        _check(cfg.eval.source.endswith((".jsonl", ".json", ".parquet")), "eval.source", cfg.eval.source,
               "must be 'synthetic_math' or a .jsonl/.parquet file")
    _check_teachers(cfg)
    if cfg.priming.strategy == "answer_hint":
        _check(cfg.data.answer_field is not None, "data.answer_field", None,
               "priming.strategy=answer_hint needs the reference answer field")
    return cfg


def _check_teacher_answers(cfg: Config, i: int, ph: PhaseConfig, loss: LossConfig) -> None:
    """``schedule[i].teacher_answers``: an online phase whose loss reads y_t, one teacher, and for
    ``offline`` an offline phase before it."""
    if ph.teacher_answers is None:
        return
    where = f"schedule[{i}].teacher_answers"
    _check(ph.kind == "online", where, ph.teacher_answers,
           "only for online phases (an offline phase reads its teacher's answers from `data`)")
    _check(loss_needs(loss)["y_t"], where, ph.teacher_answers,
           f"loss.type={loss.type} with these weights never reads the teacher's response y_t; remove it")
    _check(len(cfg.teachers) <= 1, where, ph.teacher_answers,
           "needs a single teacher (with several, each prompt's answer comes from its routed teacher)")
    if ph.teacher_answers == "offline":
        _check(any(p.kind == "offline" for p in cfg.schedule[:i]), where, ph.teacher_answers,
               "needs an offline phase before this one (or name a dataset directory)")


def _check_engine(e, where: str) -> None:
    """One ``engine:`` section (a teacher pool's or the sampler's)."""
    _check(e.torch_threads > 0, f"{where}.torch_threads", e.torch_threads, "must be a positive integer")
    for key in ("num_cpus", "kv_cache_gb"):
        _check(getattr(e, key) >= 0, f"{where}.{key}", getattr(e, key), "must be >= 0")
    _check(0 < e.gpu_memory_utilization <= 1, f"{where}.gpu_memory_utilization", e.gpu_memory_utilization,
           "must be in (0, 1]")
    for key in ("tokens_per_s", "score_tokens_per_s"):
        _check(getattr(e.simulated, key) > 0, f"{where}.simulated.{key}", getattr(e.simulated, key), "must be > 0")
    _check(e.simulated.latency_s >= 0, f"{where}.simulated.latency_s", e.simulated.latency_s, "must be >= 0")


def _check_teacher_pool(t, where: str) -> None:
    """The fields every teacher pool has: ``teacher:`` and each entry of ``teachers:``."""
    for key in ("num_replicas", "max_new_tokens"):
        _check(getattr(t, key) > 0, f"{where}.{key}", getattr(t, key), "must be a positive integer")
    for key in ("top_k_logprobs", "temperature"):
        _check(getattr(t, key) >= 0, f"{where}.{key}", getattr(t, key), "must be >= 0")
    _check(0 < t.top_p <= 1, f"{where}.top_p", t.top_p, "must be in (0, 1]")
    _check_engine(t.engine, f"{where}.engine")


def _check_teachers(cfg: Config) -> None:
    """``teachers:`` names are unique and valid, and ``route`` names only them (one rule)."""
    names = [t.name for t in cfg.teachers]
    for i, t in enumerate(cfg.teachers):
        _check(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", t.name) is not None, f"teachers[{i}].name", t.name,
               "letters, digits, '.', '_' and '-' only (it names the teacher's actors)")
        _check(names.index(t.name) == i, f"teachers[{i}].name", t.name, "duplicate teacher name")
        _check_teacher_pool(t, f"teachers[{i}]")
    r = cfg.route
    if not cfg.teachers:
        _check(r.field is None and not r.weights, "route", dataclasses.asdict(r), "needs a `teachers:` list")
        return
    _check(r.field is None or not r.weights, "route", dataclasses.asdict(r), "set route.field or route.weights, not both")
    if len(names) > 1:
        _check(r.field is not None or bool(r.weights), "route", dataclasses.asdict(r),
               f"several teachers ({', '.join(names)}) need route.field or route.weights")
        _check(cfg.buffer.rows == "actor", "buffer.rows", cfg.buffer.rows, "several teachers need buffer.rows=actor")
    for name, w in r.weights.items():
        _check(name in names, f"route.weights.{name}", w, f"unknown teacher (teachers: {', '.join(names)})")
        _check(w >= 0, f"route.weights.{name}", w, "must be >= 0")
    if r.weights:
        _check(sum(r.weights.values()) > 0, "route.weights", r.weights, "must have a positive weight")


def _check_loss(loss: LossConfig, where: str) -> LossConfig:
    """Check one loss section (``loss`` or ``schedule[i].loss``) and return it with the method's
    defaults filled in, so that the resolved config shows every weight as a number."""
    _check(loss.type in LOSS_TYPES, f"{where}.type", loss.type, f"must be one of {', '.join(LOSS_TYPES)}")
    if loss.type not in DIVERGENCES:
        _check(loss.student_ratio is None, f"{where}.student_ratio", loss.student_ratio,
               f"only for the token-level divergences ({', '.join(DIVERGENCES)}); loss.type={loss.type} fixes "
               "its sequences (dpkd: y_t and y_s; dpkd_token, sft: y_t; pg_rkl: y_s)")
    loss = resolve_loss(loss)
    for key in ("kd_coef", "sft_coef"):
        _check(getattr(loss, key) >= 0, f"{where}.{key}", getattr(loss, key), "must be >= 0")
    _check(loss.kd_coef > 0 or loss.sft_coef > 0, f"{where}.kd_coef", loss.kd_coef,
           f"must be > 0 when {where}.sft_coef is 0 (with both 0 the loss is 0)")
    if loss.type == "sft":
        _check(loss.kd_coef == 0, f"{where}.kd_coef", loss.kd_coef,
               "must be 0 for loss.type=sft (it has no distillation term; sft_coef weights its CE)")
    if loss.type in DIVERGENCES:
        _check(0 <= loss.student_ratio <= 1, f"{where}.student_ratio", loss.student_ratio, "must be in [0, 1]")
        _check(loss.temperature == 1, f"{where}.temperature", loss.temperature,
               f"must be 1 with loss.type={loss.type}: the learner gets the teacher's top-k log-probs, and a "
               "tempered top-k divergence is a different objective, not an approximation (set "
               f"{where}.temperature=1)")
    _check(loss.beta > 0, f"{where}.beta", loss.beta, "must be > 0")
    _check(loss.temperature > 0, f"{where}.temperature", loss.temperature, "must be > 0")
    _check(0 <= loss.label_smoothing < 0.5, f"{where}.label_smoothing", loss.label_smoothing,
           "must be in [0, 0.5)")
    _check(0 <= loss.jsd_beta <= 1, f"{where}.jsd_beta", loss.jsd_beta, "must be in [0, 1]")
    _check(0 <= loss.skew_alpha < 1, f"{where}.skew_alpha", loss.skew_alpha, "must be in [0, 1)")
    _check(loss.topk_tail in TOPK_TAILS, f"{where}.topk_tail", loss.topk_tail,
           "must be 'uniform' (the teacher's tail mass spread over the ids outside its top-k) or 'bucket' "
           "(the tail as one outcome)")
    return loss


def check_paths(cfg: Config, datasets: bool = True) -> Config:
    """The files a config names exist (separate from ``validate`` so a config written for a cluster
    can be checked anywhere). ``datasets=False`` for ``raykd generate``, which writes them."""
    if cfg.data.source != "synthetic_math" and not cfg.data.source.startswith("hf:"):
        _check_file(cfg.data.source, "data.source")
    if cfg.eval.source != "synthetic_math":
        _check_file(cfg.eval.source, "eval.source")
    for i, ph in enumerate(cfg.schedule):
        if ph.kind == "offline" and datasets and ph.data is not None:
            _check((Path(ph.data).expanduser() / "manifest.json").is_file(), f"schedule[{i}].data", ph.data,
                   "must be a dataset directory written by `raykd generate`")
        if datasets and ph.teacher_answers not in (None, "offline"):
            _check((Path(ph.teacher_answers).expanduser() / "manifest.json").is_file(),
                   f"schedule[{i}].teacher_answers", ph.teacher_answers,
                   "must be 'offline' or a dataset directory written by `raykd generate`")
    from driver.trackers import missing

    if missing(cfg.run.report_to):
        raise ConfigError(missing(cfg.run.report_to))
    if cfg.learner.deepspeed_config is not None:
        _check(Path(cfg.learner.deepspeed_config).is_file(), "learner.deepspeed_config",
               cfg.learner.deepspeed_config, "file does not exist")
    return cfg


def _check_file(path: str, key: str) -> None:
    p = Path(path).expanduser()
    _check(not p.is_dir(), key, path, "is a directory, not a file")
    _check(p.is_file(), key, path, "file does not exist")


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected dotted.key=value")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for item in overrides or []:
        keys, value = _parse_override(item)
        node = data
        for k in keys[:-1]:
            if not isinstance(node.get(k, {}), dict):
                raise ConfigError(f"--set {item}: '{k}' is not a section")
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                check_files: bool = True, saved: bool = False) -> Config:
    """``saved``: a run directory's own config.yaml, which runs written before the schedule set
    ``learner.max_steps`` saved with the (unused) default beside a schedule: the schedule wins."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} {'is a directory' if p.is_dir() else 'does not exist'}")
        data = _read_yaml(p)
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: top level must be a mapping")
    data = apply_overrides(data, overrides or [])
    cfg = validate(_build(Config, data, ""))
    if cfg.schedule:  # the schedule sets the run's length; learner.max_steps then shows it
        given = (data.get("learner") or {}).get("max_steps")
        total = cfg.total_steps()
        _check(given is None or given == total or saved, "learner.max_steps", given,
               f"a schedule sets the run's length ({total} steps in {len(cfg.schedule)} phases); remove "
               "learner.max_steps or change schedule[i].steps")
        cfg.learner.max_steps = total
    return check_paths(cfg) if check_files else cfg


def _read_yaml(p: Path) -> Any:
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{p}:{mark.line + 1}:{mark.column + 1}" if mark else str(p)
        raise ConfigError(f"{where}: invalid YAML: {e.problem or e.context}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: invalid YAML: {str(e).splitlines()[0]}") from None
    if data is None:
        raise ConfigError(f"{p} is empty; for every default, write `{{}}` in it")
    return data


def dump_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
