"""Learner: one DeepSpeed rank training the student on replay-buffer batches.

The training maths lives in ``kd.objective``; this actor owns the DeepSpeed engine (ZeRO stage from
the config, gloo on CPU, NCCL on GPU), the LR schedule, and gathering full weights for the samplers.
"""

from __future__ import annotations

import os
import time

import torch


def deepspeed_config(lcfg, micro_batch: int) -> dict:
    """The DeepSpeed config for a ``LearnerConfig`` (a JSON file given in the config wins)."""
    if lcfg.deepspeed_config:
        import json

        with open(lcfg.deepspeed_config) as f:
            return json.load(f)
    cfg = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": lcfg.zero_stage},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if lcfg.grad_clip > 0:
        cfg["gradient_clipping"] = lcfg.grad_clip
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        cfg["bf16"] = {"enabled": True}
    return cfg


class Learner:
    """Ray actor (named ``learner-<rank>``)."""

    def __init__(self, rank: int, world_size: int, master_addr: str, master_port: int,
                 model_path: str, learner_cfg, loss_cfg, seed: int = 0):
        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(rank),
                          WORLD_SIZE=str(world_size), LOCAL_RANK="0")
        torch.set_num_threads(learner_cfg.torch_threads)
        torch.manual_seed(seed)
        import deepspeed
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.rank, self.world_size = rank, world_size
        self.lcfg, self.loss_cfg = learner_cfg, loss_cfg
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        model.config.use_cache = False
        tok = AutoTokenizer.from_pretrained(model_path)
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        optim = torch.optim.AdamW(model.parameters(), lr=learner_cfg.lr,
                                  weight_decay=learner_cfg.weight_decay)
        warmup = learner_cfg.warmup_steps
        sched = torch.optim.lr_scheduler.LambdaLR(
            optim, lambda s: min(1.0, (s + 1) / warmup) if warmup > 0 else 1.0)
        micro = learner_cfg.batch_size // world_size
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optim, lr_scheduler=sched,
            config=deepspeed_config(learner_cfg, micro))
        self.steps = 0

    def ready(self) -> int:
        return self.rank

    def _global_counts(self, table) -> tuple[int, dict]:
        import torch.distributed as dist

        local = torch.tensor([table.num_rows,
                              sum(map(len, table.column("chosen_ids").to_pylist())),
                              sum(map(len, table.column("rejected_ids").to_pylist()))],
                             dtype=torch.float64)
        if self.world_size > 1:
            dist.all_reduce(local)
        pairs, c, r = (int(x) for x in local.tolist())
        return pairs, {"chosen": c, "rejected": r}

    def train_step(self, table, loss_cfg=None) -> dict:
        """One optimiser step on this rank's share of ``table`` (rows ``rank::world_size``)."""
        from kd.objective import compute_loss

        t = time.perf_counter()
        if self.world_size > 1:
            table = table.take(list(range(self.rank, table.num_rows, self.world_size)))
        pairs, tokens = self._global_counts(table)
        self.engine.train()
        loss, metrics = compute_loss(self.engine, table, loss_cfg or self.loss_cfg, self.pad_id, pairs, tokens,
                                     self.world_size)
        self.engine.backward(loss)
        self.engine.step()
        self.steps += 1
        versions = [v for v in table.column("policy_version").to_pylist() if v >= 0]
        metrics.update(lr=self.scheduler.get_last_lr()[0], grad_norm=_grad_norm(self.engine),
                       train_step_s=time.perf_counter() - t,
                       batch_policy_version=sum(versions) / len(versions) if versions else 0.0)
        return metrics

    def get_weights(self) -> dict | None:
        """The full state dict on rank 0 (None elsewhere). Every rank must call it under ZeRO-3,
        where gathering the partitioned parameters is a collective."""
        module = self.engine.module
        if self.lcfg.zero_stage == 3:
            from deepspeed.runtime.zero import GatheredParameters

            with GatheredParameters(list(module.parameters()), modifier_rank=None):
                sd = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()} \
                    if self.rank == 0 else None
            return sd
        if self.rank != 0:
            return None
        return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}

    def save_hf(self, path: str, tokenizer_src: str) -> str | None:
        """Write the student in Hugging Face format (safetensors + tokenizer); rank 0 writes."""
        from transformers import AutoTokenizer

        sd = self.get_weights()
        if self.rank != 0:
            return None
        self.engine.module.save_pretrained(path, state_dict=sd, safe_serialization=True)
        AutoTokenizer.from_pretrained(tokenizer_src).save_pretrained(path)
        return path


def _grad_norm(engine) -> float:
    norm = engine.get_global_grad_norm()
    if norm is None:
        return float("nan")
    return float(norm.item() if hasattr(norm, "item") else norm)
