"""Learner: one DeepSpeed rank training the student on replay-buffer batches.

The training maths lives in ``kd.objective``; this actor owns the DeepSpeed engine (ZeRO stage from
the config or a DeepSpeed JSON, gloo on CPU, NCCL on GPU), gradient accumulation, the LR schedule,
optional LoRA (peft), checkpoints, and handing out full weights (merged under LoRA) for the samplers.

Life cycle (driven by ``LearnerGroup``): ``__init__`` loads the model (all ranks in parallel),
``address()`` on rank 0 gives the rendezvous, ``setup(addr, port)`` on every rank joins the group
and builds the engine. Every method that gathers or reduces is a collective: call it on every rank,
in the same order (Ray runs an actor's calls in submission order).
"""

from __future__ import annotations

import json
import os
import random
import time

import torch

from kd.models import hf_kwargs

CHECKPOINT_TAG = "ds"  # DeepSpeed's files go to <path>/ds/, its pointer to <path>/latest


def resolve_bf16(mode: str) -> bool:
    """``learner.bf16``: 'auto' is on where a CUDA GPU supports bf16; 'on' there or an error."""
    supported = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if mode == "on" and not supported:
        raise ValueError("learner.bf16='on': this learner has no CUDA GPU with bf16 support (DeepSpeed's "
                         "bf16 path needs one); use 'auto' (bf16 where supported) or 'off'")
    return supported if mode == "auto" else mode == "on"


def deepspeed_config(lcfg, world_size: int, bf16: bool) -> dict:
    """The DeepSpeed config for a ``LearnerConfig``. A JSON given in ``learner.deepspeed_config`` is
    the base: its keys win, and keys it lacks or sets to "auto" come from the LearnerConfig."""
    gas = lcfg.grad_accum_steps
    ours: dict = {
        "train_micro_batch_size_per_gpu": max(1, lcfg.batch_size // (world_size * gas)),
        "gradient_accumulation_steps": gas,
        "zero_optimization": {"stage": lcfg.zero_stage},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if lcfg.grad_clip > 0:
        ours["gradient_clipping"] = lcfg.grad_clip
    if bf16:
        ours["bf16"] = {"enabled": True}
    if not lcfg.deepspeed_config:
        return ours
    with open(lcfg.deepspeed_config) as f:
        cfg = json.load(f)
    for key, value in ours.items():
        if cfg.get(key, "auto") == "auto":
            cfg[key] = value
    if cfg.get("train_batch_size") == "auto":
        del cfg["train_batch_size"]  # DeepSpeed derives it from micro batch x accumulation x ranks
    return cfg


def split_rows(num_rows: int, rank: int, world_size: int, micro_batches: int) -> list[list[int]]:
    """This rank's rows (``rank::world_size``) in ``micro_batches`` consecutive parts (some may be
    empty when the batch is small)."""
    mine = list(range(rank, num_rows, world_size))
    return [mine[i * len(mine) // micro_batches:(i + 1) * len(mine) // micro_batches]
            for i in range(micro_batches)]


def _summed_metrics() -> set[str]:
    """Metrics that are already normalised by GLOBAL counts (a rank's micro-batch contributes a part
    of them): they add up over micro-batches and ranks. The rest are batch means: row-weighted."""
    from kd.losses import DIVERGENCES

    return {"loss", "sft_loss", "dpkd_token_loss", "pg_loss", *(f"{k}_loss" for k in DIVERGENCES)}


class Learner:
    """Ray actor (named ``learner-<rank>``)."""

    def __init__(self, rank: int, world_size: int, model_path: str, learner_cfg, loss_cfg, seed: int = 0,
                 max_new_tokens: dict | None = None):
        """``max_new_tokens``: the length budgets of y_t and y_s (``{"chosen": ..., "rejected": ...}``),
        for the health metric of how many responses ran into them (``kd.health.row_health``)."""
        torch.set_num_threads(learner_cfg.torch_threads)
        torch.manual_seed(seed)
        random.seed(seed)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.rank, self.world_size = rank, world_size
        self.lcfg, self.loss_cfg = learner_cfg, loss_cfg
        self.bf16 = resolve_bf16(learner_cfg.bf16)
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, **hf_kwargs())
        model.config.use_cache = False
        tok = AutoTokenizer.from_pretrained(model_path, **hf_kwargs())
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.tokenizer, self.budgets = tok, dict(max_new_tokens or {})
        self.lora = learner_cfg.lora is not None
        if self.lora:
            model = _with_lora(model, learner_cfg.lora)
        self.model = model
        self.engine = None
        self.scheduler = None
        self.steps = 0
        self._weight_group = None
        self._weight_store = None

    # -- set-up ----------------------------------------------------------------------------------

    def address(self) -> tuple[str, int]:
        """This node's IP and a free port on it: the group's rendezvous (asked of rank 0)."""
        import socket

        import ray

        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def setup(self, master_addr: str, master_port: int) -> int:
        """Join the data-parallel group and build the DeepSpeed engine (all ranks together)."""
        import deepspeed

        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(self.rank),
                          WORLD_SIZE=str(self.world_size), LOCAL_RANK="0")
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
        ds_cfg = deepspeed_config(self.lcfg, self.world_size, self.bf16)
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        kwargs: dict = {"model": self.model, "model_parameters": trainable, "config": ds_cfg}
        if "optimizer" not in ds_cfg:
            kwargs["optimizer"] = torch.optim.AdamW(trainable, lr=self.lcfg.lr,
                                                    weight_decay=self.lcfg.weight_decay)
            if "scheduler" not in ds_cfg:
                warmup = self.lcfg.warmup_steps
                kwargs["lr_scheduler"] = lambda opt: torch.optim.lr_scheduler.LambdaLR(
                    opt, lambda s: min(1.0, (s + 1) / warmup) if warmup > 0 else 1.0)
        self.engine, _, _, self.scheduler = deepspeed.initialize(**kwargs)
        self.zero3 = self.engine.zero_optimization_stage() == 3
        self.model = None  # the engine owns it now
        return self.rank

    def ready(self) -> int:
        return self.rank

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def cpus(self) -> int:
        """The CPUs this process may run on (its node's, unless an affinity mask narrows them)."""
        return len(os.sched_getaffinity(0))

    def set_threads(self, n: int) -> int:
        """CPU threads of this rank's torch from now on (a phase whose engines idle may use more)."""
        torch.set_num_threads(n)
        return torch.get_num_threads()

    def set_lr(self, lr: float) -> float:
        """The peak learning rate from now on (a schedule's phase may set its own); the warm-up
        factor of the current step still applies. Returns the rate of the next step."""
        sched = self.scheduler
        if not isinstance(sched, torch.optim.lr_scheduler.LambdaLR):  # a DeepSpeed config's own scheduler
            if lr != self.lcfg.lr:
                raise ValueError(f"a phase's lr ({lr}) needs raykd's own optimizer and scheduler; "
                                 "learner.deepspeed_config sets its own")
            return self._lr()
        sched.base_lrs = [lr for _ in sched.base_lrs]
        for group, factor in zip(sched.optimizer.param_groups, sched.lr_lambdas):
            group["initial_lr"], group["lr"] = lr, lr * factor(sched.last_epoch)
        return self._lr()

    def info(self) -> dict:
        """What this rank runs: for tests and the run's log."""
        params = list(self.engine.module.parameters())
        numel = [getattr(p, "ds_numel", p.numel()) for p in params]
        return {"rank": self.rank, "world_size": self.world_size, "steps": self.steps,
                "zero_stage": self.engine.zero_optimization_stage(), "bf16": self.bf16, "lora": self.lora,
                "grad_accum_steps": self.engine.gradient_accumulation_steps(),
                "trainable_params": sum(n for n, p in zip(numel, params) if p.requires_grad),
                "total_params": sum(numel)}

    # -- training --------------------------------------------------------------------------------

    def _global_counts(self, table, loss_cfg) -> dict:
        """``kd.objective.token_counts`` of the WHOLE step's batch, summed over all ranks (the
        denominators); the same function compute_loss uses, so the counts match what it reads."""
        import torch.distributed as dist

        from kd.objective import token_counts

        counts = token_counts(table, loss_cfg)
        keys = sorted(counts)  # the same order on every rank
        local = torch.tensor([counts[k] for k in keys], dtype=torch.float64)
        if self.world_size > 1:
            dist.all_reduce(local)
        return {k: int(v) for k, v in zip(keys, local.tolist())}

    def train_step(self, table, loss_cfg=None) -> dict:
        """One optimiser step on this rank's rows of ``table`` (``rank::world_size``), in
        ``gradient_accumulation_steps`` micro-batches, with ``loss_cfg`` (a ``LossConfig``; default
        the one given at start: a schedule's phases may each have their own).

        Every micro-batch's loss is normalised by the global counts of the whole step (all ranks, all
        micro-batches), so the micro-batch gradients add up to the full batch's gradient; hence
        ``backward(scale_wrt_gas=False)``: DeepSpeed would otherwise divide each by the accumulation
        steps a second time. DeepSpeed averages gradients over ranks; ``compute_loss`` multiplies by
        the world size to undo that. Net: K ranks x G micro-batches take the same step as one rank
        on the whole batch in one go.
        """
        from kd import health
        from actors.replay_buffer import resolve_rows
        from kd.objective import compute_loss, resolve_loss, teacher_pools

        table = resolve_rows(table)  # buffer.rows=object_store: fetch the rows from where they are
        if table.num_rows == 0:
            raise ValueError("train_step got an empty batch")
        t = time.perf_counter()
        gas = self.engine.gradient_accumulation_steps()
        parts = split_rows(table.num_rows, self.rank, self.world_size, gas)
        mine = table.take([i for p in parts for i in p]) if self.world_size > 1 else table
        loss_cfg = resolve_loss(loss_cfg or self.loss_cfg)
        counts = self._global_counts(mine, loss_cfg)
        self.engine.train()
        sums: dict[str, list[float]] = {}  # key -> [value sum, weight]
        summed = _summed_metrics()
        lr = self._lr()  # the rate this step uses (the scheduler moves on with the step)
        healthy: dict = {}  # kd.health sums of this rank's part: added to `sums` as they are
        pools = teacher_pools(table)  # the whole step's: the same on every rank
        by_teacher: dict | None = {} if len(pools) > 1 else None  # METRIC/NAME sums, like `healthy`
        grad_norm = None
        for rows in parts:
            # An empty part still runs a forward/backward (on row 0, weight 0): under ZeRO-3 every
            # rank must run the same number of forwards, as each gathers parameters collectively.
            micro = table.take(rows or [0])
            loss, metrics = compute_loss(self.engine, micro, loss_cfg, self.pad_id, counts, self.world_size,
                                         health=healthy if rows else None,
                                         by_teacher=by_teacher if rows else None)
            self.engine.backward(loss if rows else loss * 0.0, scale_wrt_gas=False)
            if self.engine.is_gradient_accumulation_boundary():
                grad_norm = self._plain_grad_norm()
            self.engine.step()  # DeepSpeed updates only at the accumulation boundary
            if rows:
                for k, v in metrics.items():
                    w = 1.0 if k in summed else len(rows)
                    acc = sums.setdefault(k, [0.0, 0.0])
                    acc[0] += v * w
                    acc[1] += w
        self.steps += 1
        health.add(healthy, self._row_health(mine))
        if by_teacher is not None:
            health.add(healthy, by_teacher)
            health.add(healthy, self._row_health_by_teacher(mine, pools))
        for k, (v, w) in healthy.items():  # a mean over the step's positions / rows, all ranks
            sums[k] = [v, w]
        metrics = self._reduce_metrics(sums, summed)
        if by_teacher is not None:
            names = table.column("teacher_name").to_pylist()
            metrics.update({f"rows/{p}": names.count(p) for p in pools})
        versions = [v for v in table.column("policy_version").to_pylist() if v >= 0]
        metrics.update(lr=lr, grad_norm=_grad_norm(self.engine, grad_norm),
                       train_step_s=time.perf_counter() - t, learner_threads=torch.get_num_threads(),
                       batch_policy_version=sum(versions) / len(versions) if versions else 0.0)
        return metrics

    def _row_health(self, table) -> dict:
        from kd.health import row_health

        decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True).strip()  # noqa: E731
        return row_health(table, self.budgets, self.tokenizer.eos_token_id, decode)

    def _row_health_by_teacher(self, table, pools: list[str]) -> dict:
        """``kd.health.row_health`` of each pool's rows of ``table`` as ``METRIC/NAME`` (no decoding:
        exact match is left to the whole batch's)."""
        import pyarrow.compute as pc

        from kd.health import row_health

        out: dict = {}
        for name in pools:
            part = table.filter(pc.equal(table.column("teacher_name"), name))
            if part.num_rows:
                out.update({f"{k}/{name}": v for k, v in
                            row_health(part, self.budgets, self.tokenizer.eos_token_id).items()})
        return out

    def _reduce_metrics(self, sums: dict, summed: set) -> dict:
        """Metrics of the whole step: global sums for the globally normalised ones, row-weighted means
        for the rest (a collective when K > 1)."""
        if self.world_size > 1:
            import torch.distributed as dist

            every: list = [None] * self.world_size
            dist.all_gather_object(every, sums)
            sums = {}
            for part in every:
                for k, (v, w) in part.items():
                    acc = sums.setdefault(k, [0.0, 0.0])
                    acc[0] += v
                    acc[1] += w
        return {k: v if k in summed else v / max(w, 1e-12) for k, (v, w) in sums.items()}

    def _plain_grad_norm(self) -> float | None:
        """The (all-reduced, pre-clipping) gradient norm where DeepSpeed does not record one: ZeRO
        stage 0 without a mixed-precision optimizer."""
        if self.engine.zero_optimization_stage() != 0 or self.bf16:
            return None
        grads = [p.grad.detach().float().norm() for p in self.engine.module.parameters() if p.grad is not None]
        return float(torch.stack(grads).norm()) if grads else 0.0

    def _lr(self) -> float:
        return float(self.engine.get_lr()[0])

    # -- weights ---------------------------------------------------------------------------------

    def get_weights(self) -> dict | None:
        """The full HF-named state dict on rank 0 (merged under LoRA; None on other ranks). A
        collective under ZeRO-3: every rank must call it."""
        from actors.weight_sync import iter_full_weights

        mat = self.rank == 0
        # Views of CPU parameters are returned as they are: Ray copies the return value into the object
        # store before this actor runs its next call, so one copy fewer. Gathered ZeRO-3 tensors are
        # freed when their gather ends, and GPU tensors must come to the CPU: those are copied here.
        copy = self.zero3 or next(self.engine.module.parameters()).device.type != "cpu"
        sd = {name: t.to("cpu", copy=True) if copy else t for name, t in
              iter_full_weights(self.engine.module, self.zero3, materialize=mat)}
        return sd if mat else None

    def weight_meta(self) -> list:
        from actors.weight_sync import weight_meta

        return weight_meta(self.engine.module)

    def open_weight_group(self, world_size: int) -> tuple[str, int]:
        """Rank 0: start the broadcast group's store; returns its (host, port)."""
        from actors.weight_sync import BroadcastGroup

        self._weight_store, host, port = BroadcastGroup.open_store(world_size)
        return host, port

    def join_weight_group(self, world_size: int, backend: str) -> int:
        """Rank 0 joins the broadcast group as its rank 0 (other ranks have nothing to join)."""
        from actors.weight_sync import BroadcastGroup

        if self.rank == 0:
            self._weight_group = BroadcastGroup(self._weight_store, 0, world_size, backend)
        return self.rank

    def broadcast_weights(self, plan: list) -> int:
        """Broadcast the full weights bucket by bucket (rank 0); every rank iterates for the ZeRO-3
        gathers. Returns the bytes sent."""
        from actors.weight_sync import broadcast_buckets, iter_full_weights, weight_meta

        module = self.engine.module
        if self.rank != 0:
            for _ in iter_full_weights(module, self.zero3, materialize=False):
                pass
            return 0
        return broadcast_buckets(self._weight_group, iter_full_weights(module, self.zero3),
                                 weight_meta(module), plan)

    def save_hf(self, path: str, tokenizer_src: str) -> str | None:
        """Write the student in Hugging Face format (safetensors + tokenizer; merged under LoRA, under
        the base model's names); rank 0 writes, every rank must call it (ZeRO-3 gathers)."""
        from transformers import AutoTokenizer

        from actors.weight_sync import hf_model

        sd = self.get_weights()
        if self.rank != 0:
            return None
        hf_model(self.engine.module).save_pretrained(path, state_dict=sd, safe_serialization=True)
        AutoTokenizer.from_pretrained(tokenizer_src, **hf_kwargs()).save_pretrained(path)
        return path

    # -- checkpoints -----------------------------------------------------------------------------

    def save_checkpoint(self, path: str) -> str:
        """Save this rank's share of a resumable checkpoint under ``path`` (every rank, together):
        DeepSpeed's module, optimizer and LR-scheduler state, plus this rank's step counter and RNG
        states. ``path`` must be one directory every rank can reach (a shared file system when the
        learners span nodes)."""
        os.makedirs(path, exist_ok=True)
        self.engine.save_checkpoint(path, tag=CHECKPOINT_TAG, client_state={"learner_steps": self.steps})
        state = {"steps": self.steps, "rng": _rng_state(), "world_size": self.world_size}
        torch.save(state, os.path.join(path, CHECKPOINT_TAG, f"learner_rank{self.rank}.pt"))
        return path

    def load_checkpoint(self, path: str) -> int:
        """Restore what ``save_checkpoint`` wrote (every rank, together); returns the step counter."""
        own = os.path.join(path, CHECKPOINT_TAG, f"learner_rank{self.rank}.pt")
        if not os.path.isfile(own):
            raise FileNotFoundError(f"{path}: no learner checkpoint for rank {self.rank} ({own} is missing)")
        state = torch.load(own, weights_only=True)
        if state["world_size"] != self.world_size:  # ZeRO partitions and RNG streams are per rank
            raise ValueError(f"{path}: saved by {state['world_size']} learners, loading into "
                             f"{self.world_size} (set learner.num_learners={state['world_size']})")
        load_path, _ = self.engine.load_checkpoint(path, tag=CHECKPOINT_TAG, load_optimizer_states=True,
                                                   load_lr_scheduler_states=True)
        if load_path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint under {path}/{CHECKPOINT_TAG}")
        self.steps = state["steps"]
        _set_rng_state(state["rng"])
        return self.steps


def _with_lora(model, lcfg):
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as e:
        raise ImportError("learner.lora needs peft: pip install 'raykd[lora]'") from e
    cfg = LoraConfig(r=lcfg.r, lora_alpha=lcfg.alpha, lora_dropout=lcfg.dropout,
                     target_modules=list(lcfg.target_modules), task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, cfg)
    except ValueError as e:  # peft's message names the modules it did not find
        raise ValueError(f"learner.lora.target_modules={list(lcfg.target_modules)}: {e}") from e


def _rng_state() -> dict:
    import numpy as np

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    # plain tensors, ints and lists only, so that loading needs no pickle (torch.load weights_only)
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
             "python_version": random.getstate()[0], "python_gauss": random.getstate()[2],
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _grad_norm(engine, fallback: float | None) -> float:
    norm = engine.get_global_grad_norm()
    if norm is None:
        return float("nan") if fallback is None else fallback
    return float(norm.item() if hasattr(norm, "item") else norm)
