"""LearnerGroup: K learner actors forming one data-parallel DeepSpeed group.

The actors are placed with a Ray placement group (one bundle per learner: its CPUs, GPUs and custom
node-type resources; strategy ``PACK`` by default, ``SPREAD`` selectable). Each rank receives the same
batch (one object in the Ray object store) and trains on rows ``rank::K``; losses are normalised by
global counts so K ranks take the same step as one.

Every method that reaches the learners calls ALL ranks, in the same order, because most of them are
collectives (gradient all-reduce, ZeRO-3 gathers, checkpoint barriers).
"""

from __future__ import annotations

import os

import ray

from kd.errors import UserInputError


def auto_threads(nodes: list[str], cpus: list[int]) -> list[int]:
    """``learner.offline_torch_threads: auto``: each rank's torch threads, given its node and the CPUs
    its process may run on: those CPUs split evenly among the ranks on that node, at least 1."""
    from collections import Counter

    ranks_on = Counter(nodes)
    return [max(1, c // ranks_on[n]) for n, c in zip(nodes, cpus)]


class PlacementError(UserInputError):
    """The learners' placement group cannot be placed on this cluster."""


def learner_bundle(num_cpus: float, num_gpus: float, resources: dict | None) -> dict[str, float]:
    """One learner's placement-group bundle (zero amounts left out: Ray rejects them)."""
    bundle = {"CPU": float(num_cpus), "GPU": float(num_gpus),
              **{k: float(v) for k, v in (resources or {}).items()}}
    bundle = {k: v for k, v in bundle.items() if v > 0}
    return bundle or {"CPU": 0.01}  # a bundle cannot be empty; a sliver of a CPU places anywhere


def describe_cluster() -> str:
    """Each alive node's total and available resources (only the kinds that matter here)."""
    avail = _available_per_node()
    lines = []
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        total = _relevant(node.get("Resources", {}))
        free = _relevant(avail.get(node["NodeID"], total))
        lines.append(f"node {node['NodeID'][:8]}: total {_fmt(total)}, available {_fmt(free)}")
    return "; ".join(lines)


def _available_per_node() -> dict:
    try:
        from ray._private.state import available_resources_per_node  # private; fall back below
        return available_resources_per_node()
    except Exception:
        return {}


def _relevant(res: dict) -> dict:
    return {k: v for k, v in res.items()
            if not k.startswith("node:") and k not in ("memory", "object_store_memory")}


def _fmt(res: dict) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(res.items())) + "}"


class LearnerGroup:
    def __init__(self, num_learners: int, actor_options: dict, model_path: str, learner_cfg,
                 loss_cfg, seed: int = 0, placement_strategy: str | None = None,
                 placement_timeout_s: float = 120.0, name_prefix: str = "learner",
                 zero_copy_weights: bool = True, max_new_tokens: dict | None = None):
        """``actor_options``: ``num_cpus``/``num_gpus``/``resources`` of ONE learner (they become
        its bundle; a ``runtime_env`` is passed on). ``placement_strategy`` defaults to
        ``learner_cfg.placement_strategy``. ``zero_copy_weights``: the learners put their weights
        into the object store with Ray's zero-copy tensor serialization (samplers then read them
        straight from shared memory, read-only; 3-9x faster weight sync for 50-135M parameters here,
        see benchmarks/weight_sync.py); it applies only to what the learners return. ``max_new_tokens``:
        the y_t / y_s length budgets, for the health metrics (``actors.learner.Learner``)."""
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from actors.learner import Learner

        # Fails here, before any actor starts; on GPU learners the actor checks bf16 support itself.
        if learner_cfg.bf16 == "on" and not actor_options.get("num_gpus"):
            raise UserInputError("learner.bf16='on' needs learners with GPUs (learner.num_gpus > 0); "
                                 "use 'auto' or 'off' on CPU")
        strategy = placement_strategy or getattr(learner_cfg, "placement_strategy", "PACK")
        if strategy not in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"):
            raise UserInputError(f"learner.placement_strategy={strategy!r}: must be PACK or SPREAD")
        bundle = learner_bundle(actor_options.get("num_cpus", 1), actor_options.get("num_gpus", 0),
                                actor_options.get("resources"))
        self.bundles = [dict(bundle) for _ in range(num_learners)]
        # unique name: placement-group names are cluster-wide and outlive a group that was not shut down
        self.pg = placement_group(self.bundles, strategy=strategy,
                                  name=f"{name_prefix}-group-{os.urandom(3).hex()}")
        self._pg_removed = False
        self._wait_placed(placement_timeout_s, strategy)

        remote = ray.remote(Learner)
        opts = {k: v for k, v in actor_options.items()
                if k in ("num_cpus", "num_gpus", "resources", "runtime_env")}
        if zero_copy_weights:
            env = dict(opts.get("runtime_env") or {})
            env["env_vars"] = {**env.get("env_vars", {}), "RAY_ENABLE_ZERO_COPY_TORCH_TENSORS": "1"}
            opts["runtime_env"] = env
        self.learners = [
            remote.options(name=f"{name_prefix}-{r}", **opts, scheduling_strategy=PlacementGroupSchedulingStrategy(
                self.pg, placement_group_bundle_index=r)).remote(
                r, num_learners, model_path, learner_cfg, loss_cfg, seed, max_new_tokens)
            for r in range(num_learners)
        ]
        # Rank 0's node hosts the rendezvous; the engines are built once every rank has joined.
        addr, port = ray.get(self.learners[0].address.remote())
        self._setup = [a.setup.remote(addr, port) for a in self.learners]
        self._others: list = []  # ranks > 0 results not awaited by the caller: checked for errors

    def _wait_placed(self, timeout_s: float, strategy: str) -> None:
        from ray.util.placement_group import remove_placement_group

        ready, _ = ray.wait([self.pg.ready()], timeout=timeout_s)
        if ready:
            return
        detail = describe_cluster()
        remove_placement_group(self.pg)
        self._pg_removed = True
        raise PlacementError(
            f"the learners' placement group ({len(self.bundles)} x {_fmt(self.bundles[0])}, {strategy}) "
            f"could not be placed within {timeout_s:g}s: requested {_fmt(_total(self.bundles))} as "
            f"{len(self.bundles)} bundles; cluster: {detail}. Lower learner.num_learners or its "
            "num_cpus/num_gpus/resources, or add nodes")

    # -- the loop's API ---------------------------------------------------------------------------

    def ready_refs(self) -> list:
        return list(self._setup)

    def _all(self, method: str, *args) -> list:
        return self._each(method, [args] * len(self.learners))

    def _each(self, method: str, args_per_rank: list[tuple]) -> list:
        """``method`` on every rank in order, rank i with ``args_per_rank[i]``; ranks > 0's results are
        checked for errors later."""
        self._check_others()
        refs = [getattr(a, method).remote(*args) for a, args in zip(self.learners, args_per_rank)]
        self._others.extend(refs[1:])
        return refs

    def _check_others(self) -> None:
        """Raise a rank > 0 failure now (it would otherwise leave rank 0 waiting in a collective)."""
        if not self._others:
            return
        done, self._others = ray.wait(self._others, num_returns=len(self._others), timeout=0)
        ray.get(done)

    def train_step(self, batch_ref, loss_cfg=None) -> ray.ObjectRef:
        """Start one step on every rank (``loss_cfg``: this step's ``LossConfig``, default the
        group's); returns rank 0's metrics ref (all ranks step together)."""
        return self._all("train_step", batch_ref, loss_cfg)[0]

    def set_threads(self, n: int | str) -> list[int]:
        """Every rank's torch CPU threads from now on (``"auto"``: ``auto_threads``); returns each rank's
        count."""
        if n == "auto":
            counts = auto_threads(self.node_ids(), ray.get([a.cpus.remote() for a in self.learners]))
            return ray.get(self._each("set_threads", [(k,) for k in counts]))
        return ray.get(self._all("set_threads", n))

    def set_lr(self, lr: float) -> list[float]:
        """Every rank's peak learning rate from now on; returns each rank's rate for the next step."""
        return ray.get(self._all("set_lr", lr))

    def weights_ref(self) -> ray.ObjectRef:
        """Rank 0's full state dict, left in the object store (every rank joins the gather)."""
        return self._all("get_weights")[0]

    def save_hf(self, path: str, tokenizer_src: str) -> str:
        return ray.get(self._all("save_hf", path, tokenizer_src))[0]

    # -- checkpoints -------------------------------------------------------------------------------

    def save_checkpoint(self, path: str) -> str:
        """Every rank saves its share under ``path`` (a directory all learners can reach); returns
        when all are done."""
        ray.get(self._all("save_checkpoint", path))
        return path

    def load_checkpoint(self, path: str) -> int:
        """Every rank restores from ``path``; returns the learner step counter it had."""
        steps = ray.get(self._all("load_checkpoint", path))
        if len(set(steps)) != 1:
            raise RuntimeError(f"learner ranks restored different step counters: {steps}")
        return steps[0]

    # -- weight broadcast (see actors.weight_sync) --------------------------------------------------

    def open_weight_group(self, world_size: int) -> ray.ObjectRef:
        return self.learners[0].open_weight_group.remote(world_size)

    def join_weight_group(self, world_size: int, backend: str) -> ray.ObjectRef:
        return self.learners[0].join_weight_group.remote(world_size, backend)

    def weight_meta_ref(self) -> ray.ObjectRef:
        return self.learners[0].weight_meta.remote()

    def broadcast_weights(self, plan: list) -> list:
        return self._all("broadcast_weights", plan)

    # -- inspection and teardown ----------------------------------------------------------------------

    def node_ids(self) -> list[str]:
        return ray.get([a.node_id.remote() for a in self.learners])

    def info(self) -> list[dict]:
        return ray.get([a.info.remote() for a in self.learners])

    def shutdown(self) -> None:
        for a in self.learners:
            ray.kill(a, no_restart=True)
        self.learners = []
        self._remove_pg()

    def _remove_pg(self) -> None:
        from ray.util.placement_group import remove_placement_group

        if getattr(self, "_pg_removed", True) or not ray.is_initialized():
            return
        self._pg_removed = True
        try:
            remove_placement_group(self.pg)
        except Exception:  # already gone with the cluster
            pass

    def __del__(self):
        # The group owns its placement group (and, through it, its actors): a group dropped without
        # shutdown() must not keep its bundles' CPUs/GPUs reserved for the rest of the session.
        try:
            self._remove_pg()
        except Exception:  # interpreter shutdown: Ray and its modules may already be gone
            pass


def _total(bundles: list[dict]) -> dict:
    out: dict[str, float] = {}
    for b in bundles:
        for k, v in b.items():
            out[k] = out.get(k, 0.0) + v
    return out
