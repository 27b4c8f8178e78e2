"""Weight sync: from the learner group to the student samplers.

Two transports, chosen by ``WeightSync(mode=...)``:

- ``object_store`` (CPU, small models; the default): learner rank 0 gathers the full state dict (under
  ZeRO-3 every rank takes part in the gather), it lands in the Ray object store once (as rank 0's
  return value) and every sampler loads it from there through ``update_weights``.
- ``broadcast`` (GPU: NCCL; also runs on CPU with gloo, which is how it is tested here): a process
  group between learner rank 0 (rank 0 of the group) and the samplers (ranks 1..M), built straight
  from a ``TCPStore`` (as vLLM's ``StatelessProcessGroup`` is), so it lives beside the learners'
  DeepSpeed group instead of inside torch.distributed's one default group. The learner packs the
  weights into buckets of ``bucket_mb`` (one dtype per bucket) and broadcasts them one by one; each
  sampler receives into a flat buffer and loads the bucket's tensors into its engine (see
  ``bucket_loader``). Names, shapes and dtypes travel once through Ray (``weight_meta``); only the
  bytes go through the collective.

Either way the weights are the student's full Hugging Face-named parameters: with LoRA, merged
(``W + scale * B @ A``) under the base model's names, computed without touching the training adapter;
a tied output head is sent once (under the embedding's name), as engines re-tie it. Samplers report
the version they run.
"""

from __future__ import annotations

import datetime
import time
from typing import Callable, Iterator

import ray
import torch

from actors.lifecycle import wait_alive

# -- the learner's full weights ----------------------------------------------------------------


def hf_model(module):
    """The transformers model inside a peft wrapper (or the module itself)."""
    return module.get_base_model() if hasattr(module, "get_base_model") else module


def _lora_layer_cls():
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # peft is optional: without it there are no LoRA layers to merge
        return None
    return LoraLayer


def _merged_weight(layer, weight):
    """``W + sum of the active adapters' scale * B @ A`` (peft's own delta: fan-in/out handled),
    as a new tensor; the layer and its adapter are left as they are."""
    out = weight.detach().clone()
    if not getattr(layer, "merged", False):
        for name in layer.active_adapters:
            if name in layer.lora_A:
                out += layer.get_delta_weight(name).to(out.dtype)
    return out


def _units(module) -> Iterator[tuple[list, list]]:
    """The model in gather units: ``(parameters to gather under ZeRO-3, [(hf_name, tensor, getter)])``.

    A unit is one module's own parameters and persistent buffers, or a whole LoRA layer (base weight
    and adapters together, as the merge needs all three). Order is fixed: ``named_modules`` order.
    """
    model = hf_model(module)
    lora_cls = _lora_layer_cls()
    lora_prefixes: list[str] = []
    seen: set[int] = set()
    for mname, mod in model.named_modules():
        if any(mname.startswith(p) for p in lora_prefixes):
            continue
        prefix = f"{mname}." if mname else ""
        entries = []
        if lora_cls is not None and isinstance(mod, lora_cls):
            lora_prefixes.append(prefix)
            for pname, p in mod.get_base_layer().named_parameters(recurse=False):
                getter = (lambda m=mod, p=p: _merged_weight(m, p)) if pname == "weight" else (lambda p=p: p)
                entries.append((prefix + pname, p, getter))
            yield list(mod.parameters()), entries
            continue
        for pname, p in mod.named_parameters(recurse=False):
            if id(p) in seen:  # a tied head: the same tensor already went under the embedding's name
                continue
            seen.add(id(p))
            entries.append((prefix + pname, p, lambda p=p: p))
        for bname, b in mod.named_buffers(recurse=False):
            if b is not None and bname not in mod._non_persistent_buffers_set:
                entries.append((prefix + bname, b, lambda b=b: b))
        if entries:
            yield [p for _, p, _ in entries if isinstance(p, torch.nn.Parameter)], entries


def weight_meta(module) -> list[tuple[str, tuple, torch.dtype]]:
    """``(name, shape, dtype)`` of every full weight, in the order ``iter_full_weights`` yields them;
    no gather (ZeRO-3 parameters keep their full shape in ``ds_shape``)."""
    return [(name, tuple(getattr(t, "ds_shape", t.shape)), t.dtype)
            for _, entries in _units(module) for name, t, _ in entries]


def iter_full_weights(module, zero3: bool, materialize: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(hf_name, full tensor)``; under ZeRO-3 one unit is gathered at a time (a collective:
    every rank must iterate to the end, ranks with ``materialize=False`` only to take part). The
    tensors are views valid until the next item; copy what you keep."""
    from deepspeed.runtime.zero import GatheredParameters

    for params, entries in _units(module):
        with GatheredParameters(params, modifier_rank=None, enabled=zero3 and bool(params)):
            if materialize:
                with torch.no_grad():
                    for name, _, get in entries:
                        yield name, get().detach()


# -- buckets and the broadcast group -------------------------------------------------------------


def plan_buckets(meta: list[tuple[str, tuple, torch.dtype]], bucket_mb: float) -> list[list[int]]:
    """Split the indexes of ``meta`` into consecutive buckets of at most ``bucket_mb`` megabytes and
    one dtype each (a tensor larger than a bucket gets its own)."""
    limit = max(1, int(bucket_mb * (1 << 20)))
    buckets: list[list[int]] = []
    size, dtype = 0, None
    for i, (_, shape, dt) in enumerate(meta):
        nbytes = _numel(shape) * _itemsize(dt)
        if not buckets or dt != dtype or size + nbytes > limit:
            buckets.append([])
            size, dtype = 0, dt
        buckets[-1].append(i)
        size += nbytes
    return buckets


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


class BroadcastGroup:
    """A process group of its own (rank 0 = learner rank 0, ranks 1..M = samplers), made from a
    ``TCPStore`` and a gloo/NCCL backend object directly, outside ``torch.distributed``'s default
    group (which the learners' DeepSpeed group already occupies)."""

    def __init__(self, store, rank: int, world_size: int, backend: str, timeout_s: float = 1800):
        import torch.distributed as dist

        self.rank, self.world_size, self.backend = rank, world_size, backend
        prefixed = dist.PrefixStore("raykd-weights", store)
        timeout = datetime.timedelta(seconds=timeout_s)
        if backend == "nccl":
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = timeout
            self.pg = dist.ProcessGroupNCCL(prefixed, rank, world_size, opts)
            self.device = torch.device("cuda", torch.cuda.current_device())
        elif backend == "gloo":
            self.pg = dist.ProcessGroupGloo(prefixed, rank, world_size, timeout)
            self.device = torch.device("cpu")
        else:
            raise ValueError(f"broadcast backend {backend!r}: must be 'nccl' or 'gloo'")
        self.store = store  # keep the store (and, on rank 0, its server) alive with the group

    @staticmethod
    def open_store(world_size: int, timeout_s: float = 1800):
        """Rank 0: start the store's server on a free port; returns ``(store, host, port)``."""
        import torch.distributed as dist

        store = dist.TCPStore("0.0.0.0", 0, world_size, is_master=True,
                              timeout=datetime.timedelta(seconds=timeout_s), wait_for_workers=False)
        return store, ray.util.get_node_ip_address(), store.port

    @staticmethod
    def connect_store(host: str, port: int, world_size: int, timeout_s: float = 1800):
        import torch.distributed as dist

        return dist.TCPStore(host, port, world_size, is_master=False,
                             timeout=datetime.timedelta(seconds=timeout_s))

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> None:
        import torch.distributed as dist

        opts = dist.BroadcastOptions()
        opts.rootRank, opts.rootTensor = src, 0
        self.pg.broadcast([tensor], opts).wait()
        if tensor.is_cuda:
            torch.cuda.current_stream().synchronize()


def broadcast_buckets(group: BroadcastGroup, weights: Iterator[tuple[str, torch.Tensor]],
                      meta: list, plan: list[list[int]]) -> int:
    """Sender side (learner rank 0): copy the streamed weights into bucket buffers and broadcast each
    bucket when full. Returns the bytes sent."""
    sent = 0
    stream = iter(weights)
    for bucket in plan:
        dtype = meta[bucket[0]][2]
        buf = torch.empty(sum(_numel(meta[i][1]) for i in bucket), dtype=dtype, device=group.device)
        off = 0
        for i in bucket:
            name, t = next(stream)
            if name != meta[i][0]:
                raise RuntimeError(f"weight order changed since the plan: got {name}, expected {meta[i][0]}")
            n = t.numel()
            buf[off:off + n].copy_(t.reshape(-1))
            off += n
        group.broadcast(buf)
        sent += buf.numel() * buf.element_size()
    for _ in stream:  # finish the generator: under ZeRO-3 its gathers are collectives
        pass
    return sent


def receive_buckets(group: BroadcastGroup, meta: list, plan: list[list[int]],
                    load: Callable[[list[tuple[str, torch.Tensor]]], None]) -> int:
    """Receiver side (a sampler): receive every bucket into a flat buffer and ``load`` its tensors
    (views into the buffer, valid during the call)."""
    got = 0
    for bucket in plan:
        dtype = meta[bucket[0]][2]
        buf = torch.empty(sum(_numel(meta[i][1]) for i in bucket), dtype=dtype, device=group.device)
        group.broadcast(buf)
        items, off = [], 0
        for i in bucket:
            name, shape, _ = meta[i]
            n = _numel(shape)
            items.append((name, buf[off:off + n].view(shape)))
            off += n
        load(items)
        got += buf.numel() * buf.element_size()
    return got


# -- the sampler side, run inside a StudentSampler actor through ``__ray_call__`` -----------------


def _vllm_load_partial(worker, items: list) -> None:
    """On a vLLM worker: load some of the model's weights (GPU vLLM; the CPU backend needs the full
    set through ``reload_weights`` to repack its linears, so CPU uses the object-store path)."""
    worker.model_runner.model.load_weights(weights=iter(items))


def bucket_loader(engine) -> Callable[[list[tuple[str, torch.Tensor]]], None]:
    """How a bucket of named tensors gets into ``engine`` (HFEngine: copy into the parameters by
    name; VLLMEngine: vLLM's ``load_weights`` on its workers)."""
    if hasattr(engine, "llm"):  # VLLMEngine: an in-process engine sees the buffer's tensors directly
        return lambda items: engine.llm.collective_rpc(_vllm_load_partial, args=(items,))
    model = engine.model
    tensors = dict(model.named_parameters())
    tensors.update(model.named_buffers())

    @torch.no_grad()
    def load(items):
        for name, t in items:
            if name not in tensors:
                raise ValueError(f"weight update mismatch: unexpected={name}")
            tensors[name].copy_(t)

    return load


def _sampler_join(sampler, host: str, port: int, rank: int, world_size: int, backend: str) -> int:
    if backend == "nccl":
        torch.cuda.set_device(0)  # Ray exposes the actor's GPU as device 0
    store = BroadcastGroup.connect_store(host, port, world_size)
    sampler._raykd_weight_group = BroadcastGroup(store, rank, world_size, backend)
    return rank


def _sampler_receive(sampler, meta: list, plan: list, version: int) -> tuple[int, float]:
    """(version, seconds this sampler spent receiving and loading the weights)."""
    t = time.perf_counter()
    engine = sampler.engine
    receive_buckets(sampler._raykd_weight_group, meta, plan, bucket_loader(engine))
    if hasattr(engine, "llm"):
        engine.llm.reset_prefix_cache()  # its KV was computed by the old weights
    engine.version = version
    return version, time.perf_counter() - t


def _sampler_fetch_and_load(sampler, weights: list, version: int) -> tuple[int, float]:
    """(version, seconds this sampler spent fetching the weights from the object store and loading
    them): the ref travels inside a list, so the fetch happens (and is timed) here, not before the call."""
    t = time.perf_counter()
    sampler.update_weights(ray.get(weights[0]), version)
    return version, time.perf_counter() - t


# -- the driver side ------------------------------------------------------------------------------


class WeightSync:
    """Pushes the learner group's weights to the samplers; ``mode`` 'object_store' or 'broadcast'
    (``backend`` 'nccl' or 'gloo'; default nccl where CUDA is available, else gloo)."""

    def __init__(self, learner_group, samplers: list, mode: str = "object_store",
                 bucket_mb: float = 256.0, backend: str | None = None):
        if mode not in ("object_store", "broadcast"):
            raise ValueError(f"weight sync mode {mode!r}: must be 'object_store' or 'broadcast'")
        self.group = learner_group
        self.samplers = samplers
        self.mode = mode
        self.bucket_mb = bucket_mb
        self.backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        self.pending: list[ray.ObjectRef] = []
        self.learner_pending: list[ray.ObjectRef] = []
        self.resends: list[ray.ObjectRef] = []  # resend_to's updates (not timed as a sync)
        self.last_seconds = 0.0
        self._plan = None
        self._last: tuple | None = None  # (weights ref or None, version) of the last push

    def push(self, version: int) -> None:
        """Start pushing the learner's current weights as ``version`` (returns at once)."""
        self.wait()
        if self.mode == "object_store":
            weights = self.group.weights_ref()
            self._last = (weights, version)  # kept (one copy in the object store) for resend_to
            self.pending = [s.__ray_call__.remote(_sampler_fetch_and_load, [weights], version) for s in self.samplers]
            return
        self._last = (None, version)
        meta, plan = self._setup_broadcast()
        self.learner_pending = self.group.broadcast_weights(plan)
        self.pending = [s.__ray_call__.remote(_sampler_receive, meta, plan, version) for s in self.samplers]

    def resend_to(self, index: int) -> None:
        """Give sampler ``index`` (restarted by Ray, so back on the initial weights) the weights of
        the last push, under that push's version; queued before anything sent to it afterwards.
        Under 'broadcast' the restarted actor has left the process group: it gets the learner's
        current weights through the object store, and the group is rebuilt at the next push."""
        if self._last is None:
            return  # nothing pushed yet: the initial student is what it should run
        weights, version = self._last
        if weights is None:
            weights = self.group.weights_ref()
            self._plan = None
        self.resends.append((index, self.samplers[index].update_weights.remote(weights, version)))

    def _setup_broadcast(self):
        if self._plan is None:
            world = len(self.samplers) + 1
            host, port = ray.get(self.group.open_weight_group(world))
            refs = [self.group.join_weight_group(world, self.backend)]
            refs += [s.__ray_call__.remote(_sampler_join, host, port, i + 1, world, self.backend)
                     for i, s in enumerate(self.samplers)]
            ray.get(refs)
            meta = ray.get(self.group.weight_meta_ref())
            self._plan = (meta, plan_buckets(meta, self.bucket_mb))
        return self._plan

    def _get_or_resend(self, index: int, ref):
        """A sampler's answer to a push; if it died meanwhile, wait for Ray's restart and give it the
        last pushed weights again (object-store mode; in broadcast mode the error stands)."""
        try:
            return ray.get(ref)
        except ray.exceptions.RayActorError:
            if self.mode != "object_store" or self._last is None:
                raise
            wait_alive(self.samplers[index])
            weights, version = self._last
            return ray.get(self.samplers[index].__ray_call__.remote(_sampler_fetch_and_load, [weights], version))

    def wait(self) -> float:
        """Block until the last push reached every sampler. Returns what the sync itself cost: the
        slowest sampler's seconds fetching (object store) or receiving (broadcast) the weights and
        loading them, not the time the push waited in a sampler's queue behind a generation."""
        if self.pending:
            answers = [self._get_or_resend(i, ref) for i, ref in enumerate(self.pending)]
            ray.get(self.learner_pending)
            versions = [v for v, _ in answers]
            self.last_seconds = max(seconds for _, seconds in answers)
            self.pending, self.learner_pending = [], []
            if len(set(versions)) != 1:
                raise RuntimeError(f"samplers report different versions after a sync: {versions}")
        if self.resends:
            refs, self.resends = self.resends, []
            for i, ref in refs:
                self._get_or_resend(i, ref)
        return self.last_seconds
