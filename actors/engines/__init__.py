"""Inference backends behind one interface (``base.Engine``): the HF reference and vLLM, plus
``simulated`` (no model: a measuring instrument for the orchestration, see ``simulated.py``)."""

from __future__ import annotations

import importlib.util

from actors.engines.base import Engine, Generation, SamplingParams, Scores

__all__ = ["Engine", "Generation", "SamplingParams", "Scores", "make_engine", "resolve_backend"]


def resolve_backend(backend: str) -> str:
    """'auto' means vLLM wherever it is installed, else the HF engine."""
    if backend == "auto":
        return "vllm" if importlib.util.find_spec("vllm") is not None else "hf"
    return backend


def make_engine(backend: str, model_path: str, **opts) -> Engine:
    """Build an engine in the calling process (an actor). ``opts`` are backend options; each backend
    ignores the ones it has no use for."""
    backend = resolve_backend(backend)
    if backend == "hf":
        import torch

        from actors.engines.hf_engine import HFEngine

        if opts.get("num_threads"):
            torch.set_num_threads(int(opts["num_threads"]))

        return HFEngine(model_path, dtype=opts.get("dtype", "float32"))
    if backend == "vllm":
        from actors.engines.vllm_engine import VLLMEngine

        return VLLMEngine(model_path, **opts)
    if backend == "simulated":  # never chosen by 'auto': only when a config names it
        from actors.engines.simulated import SimulatedEngine

        sim = opts.get("simulated") or {}
        return SimulatedEngine(model_path, seed=opts.get("seed", 0), **sim)
    raise ValueError(f"unknown engine backend {backend!r}: expected 'hf', 'vllm', 'simulated' or 'auto'")
