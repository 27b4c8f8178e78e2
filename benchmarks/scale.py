"""Sampling at scale, by simulation: where the driver, the replay buffer and the weight sync (rather
than the GPUs) set the pace.

    python benchmarks/scale.py [--quick] [--replicas 1,2,4,8] [--learners 1,2,4] [--steps 24]
                               [--response-tokens 384] [--top-k 20] [--variants before,after]
                               [--json OUT.json]

A local multi-node Ray cluster (``ray.cluster_utils.Cluster``: a head node for the driver and the
replay buffer, ``inference_gpu`` nodes with 8 fake GPUs and ``raykd_inference: 8`` each, one
``learner_gpu`` node with 8 fake GPUs and ``raykd_learner: 8``, as in ``cluster.yaml``) runs the real
raykd online loop (``driver.online.run_online``: real driver, real ``replay-buffer`` actor, real
producers, real object-store weight sync, real DeepSpeed learners) with **simulated** teachers and
samplers (``engine.backend: simulated``: no model; random tokens of the configured shapes after the
delay a replica at the configured tokens/s would take; see ``actors/engines/simulated.py``). The
learners train a tiny random Llama (``kd.models.make_tiny_model``, 1 layer): tiny so that the learner
is not what sets the pace (the table says when it was anyway: ``learner-bound``).

A "producer replica" is one sampler plus one teacher. For every point (R replicas, K learner ranks)
it reports measured pairs/s in the steady state (between the first ``--warmup`` steps and the end),
the ideal ``R x per-replica rate`` (from the configured rates: ``P / max(sampler call, teacher
calls)`` with P prompts per request), their ratio, the driver's and the buffer actor's CPU share
(process CPU seconds / wall seconds), object-store bytes per pair (computed from the measured sizes
of what travels: the sampler's generations, the teacher's rows, each learner rank's copy of the
batch, the weights to every sampler), the per-request / per-row / per-sync costs the cost model in
docs/scaling.md is built from, and checks that no prompt was lost or doubled (consumed.jsonl
against the prompts taken, the buffer's inserted and duplicate counts).

``--variants before,after`` runs each point twice in the same cluster: ``before`` with
``buffer.rows: actor`` (every row through the one ``replay-buffer`` actor, as raykd was) and ``after``
with ``buffer.rows: object_store`` (rows stay where the teachers put them; the actor keeps stubs).

``--size-points 4:16,2:32,1:64`` (default) adds points with larger requests (R replicas, P prompts
per request, each replica's rates scaled by P / ``--prompts-per-request`` so that a call takes as long
as at the base size): the same pairs/s as the base size's R*P/base point, in fewer and larger
requests. With them the cost model tells the driver's cost per request from its cost per prompt
(and the buffer's per request from per row).

``--sync-size 50m`` (default; ``none`` to skip) also times the object-store weight sync across the
nodes: one real learner (K=1) with a random student of that shape (benchmarks/weight_sync.py's
shapes) pushing to R simulated samplers on the inference nodes, median of 3 after one warm-up push.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

LEARNER_NODES = 1  # this benchmark's cluster has one learner_gpu node


def start_cluster(inference_nodes: int, object_store_mb: int):
    """Head (CPU only: driver, buffer) + inference_gpu nodes + one learner_gpu node, as cluster.yaml."""
    import ray
    from ray.cluster_utils import Cluster

    store = object_store_mb * (1 << 20)
    env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "object_store_memory": store})
    for _ in range(inference_nodes):
        cluster.add_node(num_cpus=8, num_gpus=8, resources={"raykd_inference": 8}, object_store_memory=store)
    cluster.add_node(num_cpus=8, num_gpus=8, resources={"raykd_learner": 8}, object_store_memory=store)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, runtime_env=env, log_to_driver=False, configure_logging=False)
    return cluster


def rates(args, P: int) -> tuple[float, float]:
    """A replica's (generation, scoring) tokens/s at P prompts per request: the configured rates at
    ``--prompts-per-request``, scaled by P / that, so a call takes as long whatever its size (a GPU
    engine's throughput grows with its batch). Size points thus produce pairs as fast as the base
    point with as many prompts in flight, in fewer, larger requests."""
    scale = P / args.prompts_per_request
    return args.tokens_per_s * scale, args.score_tokens_per_s * scale


def point_config(args, models: dict, root: Path, replicas: int, learners: int, variant: str, name: str,
                 P: int):
    from driver.config import load_config

    L = args.response_tokens
    rows = "actor" if variant == "before" else "object_store"
    batch = batch_size(args, replicas, P)
    gen_tps, score_tps = rates(args, P)
    engine = ["engine.backend=simulated", "engine.num_cpus=1", "engine.num_gpus=1",
              "engine.resources={raykd_inference: 1}", f"engine.simulated.latency_s={args.latency}",
              f"engine.simulated.tokens_per_s={gen_tps}", f"engine.simulated.score_tokens_per_s={score_tps}"]
    return load_config(None, [
        f"run.name={name}", f"run.runs_dir={root / 'runs'}",
        f"models.teacher={models['teacher']}", f"models.student={models['student']}",
        f"models.cache_dir={root / 'cache'}", f"data.num_prompts={args.num_prompts}",
        "data.max_prompt_tokens=256", "loss.type=dpkd",
        f"teacher.num_replicas={replicas}", f"teacher.max_new_tokens={L}", f"teacher.top_k_logprobs={args.top_k}",
        f"sampler.num_replicas={replicas}", f"sampler.max_new_tokens={L}", f"sampler.prompts_per_request={P}",
        f"buffer.rows={rows}",
        "sampler.max_steps_ahead=0",  # unpaced: each point measures what the producers can make
        *[f"teacher.{e}" for e in engine], *[f"sampler.{e}" for e in engine],
        f"learner.num_learners={learners}", "learner.num_cpus=1", "learner.num_gpus=1",
        "learner.resources={raykd_learner: 1}", f"learner.batch_size={batch}",
        f"learner.max_steps={args.steps}", "learner.lr=1e-4",
        f"buffer.capacity={args.capacity}", f"buffer.min_size_to_train={batch}",
        f"buffer.max_policy_lag={args.max_policy_lag}", f"sync.every_steps={args.sync_every}",
        "checkpoint.export_hf=false", "eval.max_new_tokens=8",
    ])


def batch_size(args, replicas: int, P: int) -> int:
    """--batch-size, or about 1.5 s of ideal production rounded to a multiple of 8 in [8, 32]: a step
    at R=1 does not wait a minute for its rows, and a step at large R is not mostly per-step overhead."""
    if args.batch_size:
        return args.batch_size
    return int(min(32, max(8, 8 * round(1.5 * ideal_pairs_per_s(args, replicas, P)[0] / 8))))


def ideal_pairs_per_s(args, replicas: int, P: int) -> tuple[float, float, float]:
    """(ideal pairs/s, one sampler call s, one teacher request s) at P prompts per request, from the
    configured rates alone."""
    L = args.response_tokens
    gen_tps, score_tps = rates(args, P)
    sampler = args.latency + P * L / gen_tps
    # the teacher generates y_t (top-k comes with it) and scores y_s: two calls
    teacher = 2 * args.latency + P * L / gen_tps + P * L / score_tps
    return replicas * P / max(sampler, teacher), sampler, teacher


def check_prompts(run_dir: Path, summary: dict, P: int) -> dict:
    """No prompt lost or doubled: every prompt taken was consumed (logged once its rows were in the
    buffer), no (epoch, prompt) twice, and the buffer inserted exactly one row per consumed prompt."""
    seen = Counter()
    for line in (run_dir / "consumed.jsonl").read_text().splitlines():
        rec = json.loads(line)
        for pid in rec["prompt_ids"]:
            seen[(rec["epoch"], pid)] += 1
    consumed = sum(seen.values())
    doubled = sum(c - 1 for c in seen.values() if c > 1)
    buf = summary["buffer"]
    problems = []
    if doubled:
        problems.append(f"{doubled} prompts consumed twice")
    if consumed != summary["prompts_requested"]:
        problems.append(f"{summary['prompts_requested']} prompts taken but {consumed} consumed")
    if buf["inserted"] != consumed or summary["pairs_added"] != consumed:
        problems.append(f"buffer inserted {buf['inserted']}, driver counted {summary['pairs_added']}, "
                        f"consumed.jsonl {consumed}")
    if buf["duplicates_dropped"]:
        problems.append(f"buffer dropped {buf['duplicates_dropped']} duplicate rows")
    return {"consumed": consumed, "doubled": doubled, "ok": not problems, "problems": problems}


class Poller:
    """Samples, every ``every`` s, (time, the driver process's CPU s, the buffer actor's CPU s, rows it
    inserted) while a run goes on, so that CPU shares and the rate come from the steady state only. The
    driver's CPU leaves out the polling thread's own; the Ray calls it makes still cost the process's
    Ray threads a little, a per-second cost that the fit's per-second term takes up."""

    def __init__(self, every: float = 0.25):
        import threading

        self.every, self.samples, self.stop = every, [], threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self):
        import ray

        handle = None
        while not self.stop.is_set():
            try:
                handle = handle or ray.get_actor("replay-buffer")
                st = ray.get(handle.stats.remote(), timeout=5)
                # the driver process's CPU less this thread's own (the polling is the benchmark's, not raykd's)
                self.samples.append((time.perf_counter(), time.process_time() - time.thread_time(), st["cpu_s"],
                                     st["inserted"]))
            except Exception:  # not created yet, or gone at the end
                handle = None
            self.stop.wait(self.every)

    def close(self):
        self.stop.set()
        self.thread.join()

    def window(self, first: int, last: int):
        """The samples from the first with >= ``first`` rows inserted to the first with >= ``last``."""
        if len(self.samples) < 2:
            raise RuntimeError(f"the poller took {len(self.samples)} sample(s) during the run: no window to measure")
        end = len(self.samples) - 1
        i = next((j for j, x in enumerate(self.samples) if x[3] >= first), end)
        k = next((j for j, x in enumerate(self.samples) if x[3] >= last), end)
        if k <= i:  # no sample between them (a loaded machine polls late): widen to the nearest ones
            i, k = min(i, end - 1), end
        return self.samples[i], self.samples[k]


def run_point(args, models, root, replicas, learners, variant, weights_bytes: int, P: int) -> dict:
    from driver.online import run_online
    from driver.prepare import prepare

    name = f"scale-{variant}-r{replicas}-k{learners}-p{P}"
    cfg = point_config(args, models, root, replicas, learners, variant, name, P)
    prep = prepare(cfg, str(root / "runs" / name), overwrite=True)
    poller = Poller()
    wall0 = time.perf_counter()
    try:
        summary = run_online(cfg, prep, progress=False)
    finally:
        poller.close()
    wall = time.perf_counter() - wall0
    rows = [json.loads(x) for x in (prep.run_dir / "metrics.jsonl").read_text().splitlines()]
    w = min(args.warmup, len(rows) - 2)
    (t_a, drv_a, buf_a, n_a), (t_b, drv_b, buf_b, n_b) = poller.window(rows[w]["pairs_added"],
                                                                         rows[-1]["pairs_added"])
    span = t_b - t_a
    measured = (n_b - n_a) / span  # rows the buffer inserted per second, in the steady state
    ideal, t_s, t_t = ideal_pairs_per_s(args, replicas, P)
    buf = summary["buffer"]
    row_bytes = buf["bytes"] / max(buf["size"], 1)
    syncs = summary["policy_version"]
    sync_s = [r["weight_sync_s"] for r in rows[w:] if r["weight_sync_s"]]
    pairs_per_sync = summary["pairs_added"] / max(syncs, 1)
    # bytes per pair between nodes, from measured sizes (learner ranks on one node share one pulled
    # copy of an object, as samplers on one node do): which node they leave matters for the ceiling
    inference_nodes = -(-2 * replicas // 8)
    through_buffer = variant == "before"
    moved = {
        "generation": args.generation_bytes_per_pair,  # sampler -> teacher (when on different nodes)
        "rows_into_buffer_node": row_bytes if through_buffer else 0.0,
        "rows_out_of_buffer_node": row_bytes * LEARNER_NODES if through_buffer else 0.0,
        "rows_teacher_nodes_to_learner_nodes": 0.0 if through_buffer else row_bytes * LEARNER_NODES,
        "weights_to_inference_nodes": min(replicas, inference_nodes) * weights_bytes / pairs_per_sync,
    }
    check = check_prompts(prep.run_dir, summary, P)
    rows_in = max(n_b - n_a, 1)
    steps_in = sum(1 for r in rows if n_a < r["pairs_added"] <= n_b)
    consumed = (summary["buffer"]["consumed"] / summary["pairs_added"]) * measured  # learner's share
    return {
        "window": {"s": span, "rows": n_b - n_a, "requests": (n_b - n_a) / P, "steps": steps_in,
                   "driver_cpu_s": drv_b - drv_a, "buffer_cpu_s": buf_b - buf_a},
        "buffer_rows": summary["buffer"].get("rows"), "trained_pairs_s": consumed, "dropped_stale": summary["buffer"]["dropped_stale"],
        "variant": variant, "replicas": replicas, "learners": learners, "prompts_per_request": P,
        "steps": summary["steps"],
        "pairs": summary["pairs_added"], "wall_s": wall, "steady_s": span,
        "measured_pairs_s": measured, "ideal_pairs_s": ideal, "efficiency": measured / ideal,
        "driver_cpu_share": (drv_b - drv_a) / span, "driver_cpu_s_per_request": (drv_b - drv_a) / (rows_in / P),
        "buffer_cpu_share": (buf_b - buf_a) / span, "buffer_cpu_s_per_row": (buf_b - buf_a) / rows_in,
        "row_bytes": row_bytes, "bytes_per_pair": sum(moved.values()), "bytes_moved": moved,
        "buffer_node_bytes_per_pair": moved["rows_into_buffer_node"] + moved["rows_out_of_buffer_node"],
        "sync_s_median": statistics.median(sync_s) if sync_s else 0.0, "syncs": syncs,
        "buffer_fill": statistics.mean(r["buffer_size"] for r in rows[w:]) / args.capacity,
        "median_step_s": statistics.median(r["step_time_s"] for r in rows[w:]),
        "teacher_busy": [t.get("busy_s", 0.0) / wall for t in summary["teachers"]],
        "sampler_call_s": t_s, "teacher_request_s": t_t, "prompts": check,
    }


def generation_bytes_per_pair(args, student: str) -> float:
    """Serialized size of one sampler answer (the object that travels sampler -> teacher), per prompt."""
    from actors.engines import SamplingParams
    from actors.engines.simulated import SimulatedEngine

    eng = SimulatedEngine(student, tokens_per_s=1e12, latency_s=0.0)
    gens = eng.generate([[1]] * args.prompts_per_request, SamplingParams(max_new_tokens=args.response_tokens))
    return len(pickle.dumps(gens, protocol=5)) / args.prompts_per_request


def weights_nbytes(student: str) -> tuple[int, int]:
    import torch
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32)
    return sum(p.numel() for p in m.parameters()), sum(p.numel() * p.element_size() for p in m.parameters())


def sync_probe(root: Path, size: str, counts: list[int], repeats: int = 3) -> list[dict]:
    """Seconds of ``WeightSync.push(); wait()`` (object_store mode) from one learner on the learner
    node to R simulated samplers on the inference nodes."""
    import ray

    from actors.learner_group import LearnerGroup
    from actors.student_sampler import StudentSampler
    from actors.weight_sync import WeightSync
    from benchmarks.weight_sync import make_student
    from driver.config import LearnerConfig, LossConfig

    path, params = make_student(size, root / "sync")
    group = LearnerGroup(1, {"num_cpus": 1, "num_gpus": 1, "resources": {"raykd_learner": 1}}, str(path),
                         LearnerConfig(), LossConfig(), name_prefix=f"sync-{size}")
    opts = {"num_cpus": 1, "num_gpus": 1, "resources": {"raykd_inference": 1}}
    samplers = [ray.remote(StudentSampler).options(name=f"sync-sampler-{i}", **opts).remote(
        i, str(path), "simulated", {}, {"max_new_tokens": 4}) for i in range(max(counts))]
    ray.get(group.ready_refs() + [x.ready.remote() for x in samplers])
    nodes = ray.get([x.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id()) for x in samplers])
    out, version = [], 0
    for m in counts:
        sync = WeightSync(group, samplers[:m], mode="object_store")
        times = []
        for i in range(repeats + 1):
            version += 1
            sync.push(version)
            t = sync.wait()
            if i:
                times.append(t)
        got = ray.get([x.__ray_call__.remote(lambda self: self.engine.weight_params) for x in samplers[:m]])
        assert got == [params] * m, f"samplers received {got} parameters, expected {params} each"
        out.append({"size": size, "params": params, "samplers": m, "nodes": len(set(nodes[:m])),
                    "sync_s": statistics.median(times)})
    for x in samplers:
        ray.kill(x)
    group.shutdown()
    return out


def nonnegative_lstsq(X: list[list[float]], y: list[float]) -> list[float]:
    """Least squares with every coefficient >= 0 (a cost is never negative): fit, drop the most
    negative term, fit the rest again, until none is negative."""
    import numpy as np

    X, y = np.asarray(X, float), np.asarray(y, float)
    keep = list(range(X.shape[1]))
    while True:
        coef = np.zeros(X.shape[1])
        if keep:
            coef[keep] = np.linalg.lstsq(X[:, keep], y, rcond=None)[0]
        if (coef >= 0).all():
            return coef.tolist()
        keep.remove(int(np.argmin(coef)))


# each part's CPU seconds over a window, as a sum of per-unit costs: the units it is fitted on
DRIVER_TERMS = ("s", "steps", "requests", "rows")  # rows: one per prompt
BUFFER_TERMS = ("s", "requests", "rows")
UNIT = {"s": "s", "steps": "step", "requests": "request", "rows": "row"}  # driver_s_per_<unit>


def fit_costs(results: list[dict]) -> dict:
    """Per-unit CPU costs over a variant's points (least squares, non-negative): the driver's CPU s =
    a * seconds + b * steps + c * requests + d * prompts; the buffer actor's = e * seconds + f * requests
    + g * rows. The per-second terms are what a part spends whatever the rate (Ray's own threads, the
    per-step calls' share). Requests and prompts are told apart only when the points have more than one
    request size (``--size-points``); with one size the per-prompt (driver) and per-request (buffer)
    terms are left out, and the other one carries both."""
    out = {}
    for v in sorted({r["variant"] for r in results}):
        pts = [r for r in results if r["variant"] == v]
        sizes = {r.get("prompts_per_request") for r in pts}
        drv = [t for t in DRIVER_TERMS if len(sizes) > 1 or t != "rows"]
        buf = [t for t in BUFFER_TERMS if len(sizes) > 1 or t != "requests"]
        if len(pts) < len(drv):
            continue
        w = [r["window"] for r in pts]
        a = nonnegative_lstsq([[x[t] for t in drv] for x in w], [x["driver_cpu_s"] for x in w])
        b = nonnegative_lstsq([[x[t] for t in buf] for x in w], [x["buffer_cpu_s"] for x in w])
        fitted = {("driver", t): c for t, c in zip(drv, a)} | {("buffer", t): c for t, c in zip(buf, b)}
        costs = {f"{part}_s_per_{UNIT[t]}": fitted.get((part, t), 0.0)  # a term left out costs 0
                 for part, terms in (("driver", DRIVER_TERMS), ("buffer", BUFFER_TERMS)) for t in terms}
        out[v] = {**costs, "points": len(pts), "sizes": sorted(sizes)}
    return out


# The stated cluster of docs/scaling.md: 64 inference GPUs + 16 learner GPUs (A100, cluster.yaml's
# node types: 8 per node), a 7B teacher and a 1B student. The GPU rates are ASSUMPTIONS (not measured
# here; docs/scaling.md says where they come from), the orchestration costs are this benchmark's fits.
CLUSTER = {
    "inference_gpus": 64, "learner_gpus": 16, "gpus_per_node": 8,
    "teacher_gen_tok_s": 2500.0,  # 7B, vLLM, one A100, large batch (assumption)
    "teacher_score_tok_s": 25000.0,  # the same GPU scoring given tokens (prefill), ~10x decode (assumption)
    "student_gen_tok_s": 10000.0,  # 1B, vLLM, one A100 (assumption)
    "student_params": 1.0e9, "prompt_tokens": 128, "response_tokens": 384,
    "learner_mfu": 0.4, "gpu_peak_flops": 312e12,  # A100 bf16 dense peak; 40% MFU (assumption)
    "batch": 256, "sync_every": 2, "weight_bytes_per_param": 2,  # bf16 weights
    "head_nic_Bps": 12.5e9 / 8,  # m6i.2xlarge (cluster.yaml's head): "up to 12.5 Gbps" (AWS)
    "object_transfer_Bps": 3e9,  # Ray object transfer per receiving node (assumption)
    "nccl_Bps": 20e9,  # NCCL broadcast over NVLink/InfiniBand (assumption)
}


def predict(costs: dict, row_bytes: float, cluster: dict = CLUSTER, prompts_per_request=(8, 64)) -> dict:
    """Each part's ceiling (pairs/s) for ``cluster`` from the fitted costs, next to its GPU-bound rate."""
    c = cluster
    L = c["response_tokens"]
    teacher_gpu_s = L / c["teacher_gen_tok_s"] + L / c["teacher_score_tok_s"]  # y_t generated, y_s scored
    student_gpu_s = L / c["student_gen_tok_s"]
    inference = c["inference_gpus"] / (teacher_gpu_s + student_gpu_s)  # best teacher:sampler split
    sampler_gpus = c["inference_gpus"] * student_gpu_s / (teacher_gpu_s + student_gpu_s)
    flops_per_pair = 6 * c["student_params"] * 2 * (c["prompt_tokens"] + L)  # fwd+bwd on y_t and y_s
    learner = c["learner_gpus"] * c["learner_mfu"] * c["gpu_peak_flops"] / flops_per_pair
    gpu_bound = min(inference, learner)
    learner_nodes = -(-c["learner_gpus"] // c["gpus_per_node"])
    sampler_nodes = -(-int(round(sampler_gpus)) // c["gpus_per_node"])
    weights = c["student_params"] * c["weight_bytes_per_param"]
    # a sync every sync_every steps stalls the samplers for its duration: the rate r must leave
    # r * sync_s / (sync_every * batch) < 1, so the ceiling is sync_every * batch / sync_s
    sync_object_store_s = weights * sampler_nodes / c["object_transfer_Bps"]  # all pull from one node
    sync_broadcast_s = weights / c["nccl_Bps"]
    out = {"gpu_bound": gpu_bound, "inference_bound": inference, "learner_bound": learner,
           "sampler_gpus": sampler_gpus, "sync_object_store": c["sync_every"] * c["batch"] / sync_object_store_s,
           "sync_broadcast": c["sync_every"] * c["batch"] / sync_broadcast_s,
           "buffer_node_nic_actor_mode": c["head_nic_Bps"] / (row_bytes * (1 + learner_nodes))}
    for v, k in costs.items():
        k = {f"{part}_s_per_{UNIT[t]}": k.get(f"{part}_s_per_{UNIT[t]}", 0.0)  # older fits lack some terms
             for part, terms in (("driver", DRIVER_TERMS), ("buffer", BUFFER_TERMS)) for t in terms}
        for P in prompts_per_request:
            # one core each, less what it spends per second whatever the rate (inf: no per-unit cost fitted)
            out[f"buffer_actor_{v}_P{P}"] = _ceiling(1 - k["buffer_s_per_s"],
                                                     k["buffer_s_per_request"] / P + k["buffer_s_per_row"])
            out[f"driver_{v}_P{P}"] = _ceiling(1 - k["driver_s_per_s"], k["driver_s_per_step"] / c["batch"]
                                               + k["driver_s_per_request"] / P + k["driver_s_per_row"])
    return out


def _ceiling(core_share: float, seconds_per_pair: float) -> float:
    return core_share / seconds_per_pair if seconds_per_pair > 0 else float("inf")


def print_prediction(pred: dict) -> None:
    gpu = pred["gpu_bound"]
    print(f"prediction, 64 inference + 16 learner A100s, 7B -> 1B (GPU rates assumed, see CLUSTER): GPU-bound "
          f"{gpu:.0f} pairs/s (inference {pred['inference_bound']:.0f}, learners {pred['learner_bound']:.0f})")
    for k, v in pred.items():
        if k not in ("gpu_bound", "inference_bound", "learner_bound", "sampler_gpus"):
            if v == float("inf"):
                print(f"  ceiling {k:<28}  unbounded: every per-unit cost was fitted as 0 (too few or too noisy points)")
            else:
                print(f"  ceiling {k:<28} {v:>10.0f} pairs/s  {v / gpu:>6.1f}x GPU-bound")


def print_table(results: list[dict], header: str) -> None:
    print(header)
    cols = ("variant", "R", "K", "P", "ideal p/s", "meas p/s", "eff", "trained p/s", "driver cpu", "buffer cpu", "drv ms/req",
            "buf ms/row", "KB/pair", "buf-node KB", "buf fill", "prompts")
    print(" ".join(f"{c:>10}" for c in cols))
    for r in results:
        print(" ".join(f"{v:>10}" for v in (
            r["variant"], r["replicas"], r["learners"], r.get("prompts_per_request", "?"), f"{r['ideal_pairs_s']:.1f}", f"{r['measured_pairs_s']:.1f}",
            f"{r['efficiency']:.2f}", f"{r['trained_pairs_s']:.1f}", f"{r['driver_cpu_share']:.2f}", f"{r['buffer_cpu_share']:.2f}",
            f"{1e3 * r['driver_cpu_s_per_request']:.2f}", f"{1e3 * r['buffer_cpu_s_per_row']:.2f}",
            f"{r['bytes_per_pair'] / 1024:.0f}", f"{r['buffer_node_bytes_per_pair'] / 1024:.0f}",
            f"{r['buffer_fill']:.2f}",
            "ok" if r["prompts"]["ok"] else "BAD")))
    for r in results:
        if not r["prompts"]["ok"]:
            print(f"  {r['variant']} R={r['replicas']} K={r['learners']}: {'; '.join(r['prompts']['problems'])}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a tiny sweep (R 2; K 1; short rows): the test's size")
    p.add_argument("--replicas", default="1,2,4,8,16")
    p.add_argument("--learners", default="1,2,4", help="learner ranks, at the largest --replicas")
    p.add_argument("--variants", default="before,after")
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--warmup", type=int, default=4, help="steps left out of the steady-state rate")
    p.add_argument("--response-tokens", type=int, default=384)
    p.add_argument("--top-k", type=int, default=20)
    p.add_argument("--prompts-per-request", type=int, default=8)
    p.add_argument("--size-points", default="4:16,2:32,1:64",
                   help="R:P points (one learner rank) at P prompts per request, the replicas' rates scaled "
                        "by P / --prompts-per-request: as many prompts in flight as at R*P/base, in larger "
                        "requests. They tell a cost per request from a cost per prompt ('' for none)")
    p.add_argument("--tokens-per-s", type=float, default=1024.0, help="one simulated replica's generation rate")
    p.add_argument("--score-tokens-per-s", type=float, default=10240.0)
    p.add_argument("--latency", type=float, default=0.05, help="simulated fixed cost per engine call, s")
    p.add_argument("--batch-size", type=int, default=0, help="learner batch (default: by R, see batch_size)")
    p.add_argument("--capacity", type=int, default=1024, help="large: producers never wait on the learner")
    p.add_argument("--max-policy-lag", type=int, default=4)
    p.add_argument("--sync-every", type=int, default=2)
    p.add_argument("--sync-size", default="50m", help="student shape for the sync probe, or 'none'")
    p.add_argument("--num-prompts", type=int, default=4096)
    p.add_argument("--object-store-mb", type=int, default=768)
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--predict-from", default=None, help="only print the prediction from a --json file")
    args = p.parse_args(argv)
    if args.predict_from:
        data = json.loads(Path(args.predict_from).read_text())
        costs = data.get("costs") or fit_costs(data["results"])
        print_prediction(predict(costs, statistics.median(r["row_bytes"] for r in data["results"])))
        return 0
    if args.quick:
        args.replicas, args.learners, args.steps, args.warmup = "2", "1", 6, 2
        args.response_tokens, args.top_k, args.batch_size, args.capacity = 32, 4, 8, 64
        args.num_prompts, args.sync_size, args.size_points = 256, "none", ""
    replicas = [int(x) for x in args.replicas.split(",")]
    sizes = []  # (R, 1, P): the size points
    for item in filter(None, args.size_points.split(",")):
        try:
            r, P = (int(x) for x in item.split(":"))
        except ValueError:
            p.error(f"--size-points: {item!r} is not R:P (replicas:prompts per request), e.g. 4:16")
        if r < 1 or P < 1:
            p.error(f"--size-points: {item!r}: R and P must be >= 1")
        sizes.append((r, 1, P))
    learners = [int(x) for x in args.learners.split(",")]
    variants = args.variants.split(",")
    import ray

    from kd.models import make_tiny_model

    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="raykd-scale-") as tmp:
        root = Path(tmp)
        models = {"teacher": str(make_tiny_model(root / "teacher", num_layers=1, seed=0)),
                  "student": str(make_tiny_model(root / "student", num_layers=1, seed=1))}
        args.generation_bytes_per_pair = generation_bytes_per_pair(args, models["student"])
        params, wbytes = weights_nbytes(models["student"])
        cluster = start_cluster(-(-2 * max(replicas + [r for r, _, _ in sizes]) // 8), args.object_store_mb)
        results, syncs = [], []
        try:
            if args.sync_size != "none":
                syncs = sync_probe(root, args.sync_size, replicas)
                for x in syncs:
                    print(f"[{time.perf_counter() - t0:.0f}s] sync {x['size']} ({x['params'] / 1e6:.1f}M params) "
                          f"to {x['samplers']} samplers on {x['nodes']} nodes: {x['sync_s']:.3f} s",
                          file=sys.stderr, flush=True)
            # every R with one learner rank, then more ranks at the largest R
            # every R with one learner rank, then more ranks at the largest R, then the request sizes
            P0 = args.prompts_per_request
            points = ([(r, 1, P0) for r in replicas] + [(max(replicas), k, P0) for k in learners if k != 1]
                      + sizes)
            for r, k, P in points:
                for v in variants:
                    res = run_point(args, models, root, r, k, v, wbytes, P)
                    results.append(res)
                    print(f"[{time.perf_counter() - t0:.0f}s] {v} R={r} K={k} P={P}: {res['measured_pairs_s']:.1f} "
                              f"of {res['ideal_pairs_s']:.1f} pairs/s (eff {res['efficiency']:.2f}), prompts "
                              f"{'ok' if res['prompts']['ok'] else 'BAD'}", file=sys.stderr, flush=True)
        finally:
            ray.shutdown()
            cluster.shutdown()
    load1 = os.getloadavg()[0]
    header = (f"raykd scale benchmark, SIMULATED teachers/samplers ({args.tokens_per_s:g} gen tok/s, "
              f"{args.score_tokens_per_s:g} score tok/s, {args.latency:g} s/call per replica), real driver/buffer/"
              f"sync/DeepSpeed learners (tiny 1-layer student, {params} params); {args.response_tokens}-token "
              f"responses, top-{args.top_k}, {args.prompts_per_request} prompts/request, batch "
              f"{args.batch_size or '8-32 by R'}, buffer capacity {args.capacity}; "
              f"{os.cpu_count()} cores; 1-min load {load0:.1f} at start, {load1:.1f} at end; "
              f"total {time.perf_counter() - t0:.0f} s")
    print_table(results, header)
    costs = fit_costs(results)
    for v, c in costs.items():
        print(f"fit {v} ({c['points']} points, {'/'.join(map(str, c['sizes']))} prompts/request): driver "
              f"{c['driver_s_per_s']:.4f} s/s + {1e3 * c['driver_s_per_step']:.2f} ms/step + "
              f"{1e3 * c['driver_s_per_request']:.3f} ms/request + {1e3 * c['driver_s_per_row']:.3f} ms/prompt; "
              f"buffer {c['buffer_s_per_s']:.4f} s/s + {1e3 * c['buffer_s_per_request']:.3f} ms/request + "
              f"{1e3 * c['buffer_s_per_row']:.3f} ms/row")
    if costs:
        print_prediction(predict(costs, statistics.median(r["row_bytes"] for r in results)))
    for x in syncs:
        print(f"weight sync (object_store, cross-node) {x['size']} {x['params'] / 1e6:.1f}M params fp32 -> "
              f"{x['samplers']} simulated samplers on {x['nodes']} inference nodes: {x['sync_s']:.3f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "weights_params": params,
                                               "results": results, "sync": syncs, "costs": costs}, indent=1))
    return 0 if all(r["prompts"]["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
