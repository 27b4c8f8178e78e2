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


def point_config(args, models: dict, root: Path, replicas: int, learners: int, variant: str, name: str):
    from driver.config import load_config

    L, P = args.response_tokens, args.prompts_per_request
    rows = "actor" if variant == "before" else "object_store"
    batch = batch_size(args, replicas)
    engine = ["engine.backend=simulated", "engine.num_cpus=1", "engine.num_gpus=1",
              "engine.resources={raykd_inference: 1}", f"engine.simulated.latency_s={args.latency}",
              f"engine.simulated.tokens_per_s={args.tokens_per_s}",
              f"engine.simulated.score_tokens_per_s={args.score_tokens_per_s}"]
    return load_config(None, [
        f"run.name={name}", f"run.runs_dir={root / 'runs'}",
        f"models.teacher={models['teacher']}", f"models.student={models['student']}",
        f"models.cache_dir={root / 'cache'}", f"data.num_prompts={args.num_prompts}",
        "data.max_prompt_tokens=256", "loss.type=dpkd",
        f"teacher.num_replicas={replicas}", f"teacher.max_new_tokens={L}", f"teacher.top_k_logprobs={args.top_k}",
        f"sampler.num_replicas={replicas}", f"sampler.max_new_tokens={L}", f"sampler.prompts_per_request={P}",
        f"buffer.rows={rows}",
        *[f"teacher.{e}" for e in engine], *[f"sampler.{e}" for e in engine],
        f"learner.num_learners={learners}", "learner.num_cpus=1", "learner.num_gpus=1",
        "learner.resources={raykd_learner: 1}", f"learner.batch_size={batch}",
        f"learner.max_steps={args.steps}", "learner.lr=1e-4",
        f"buffer.capacity={args.capacity}", f"buffer.min_size_to_train={batch}",
        f"buffer.max_policy_lag={args.max_policy_lag}", f"sync.every_steps={args.sync_every}",
        "checkpoint.export_hf=false", "eval.max_new_tokens=8",
    ])


def batch_size(args, replicas: int) -> int:
    """--batch-size, or about 1.5 s of ideal production rounded to a multiple of 8 in [8, 32]: a step
    at R=1 does not wait a minute for its rows, and a step at large R is not mostly per-step overhead."""
    if args.batch_size:
        return args.batch_size
    return int(min(32, max(8, 8 * round(1.5 * ideal_pairs_per_s(args, replicas)[0] / 8))))


def ideal_pairs_per_s(args, replicas: int) -> tuple[float, float, float]:
    """(ideal pairs/s, one sampler call s, one teacher request s), from the configured rates alone."""
    L, P = args.response_tokens, args.prompts_per_request
    sampler = args.latency + P * L / args.tokens_per_s
    # the teacher generates y_t (top-k comes with it) and scores y_s: two calls
    teacher = 2 * args.latency + P * L / args.tokens_per_s + P * L / args.score_tokens_per_s
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
    inserted) while a run goes on, so that CPU shares and the rate come from the steady state only."""

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
                self.samples.append((time.perf_counter(), time.process_time(), st["cpu_s"], st["inserted"]))
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


def run_point(args, models, root, replicas, learners, variant, weights_bytes: int) -> dict:
    from driver.online import run_online
    from driver.prepare import prepare

    name = f"scale-{variant}-r{replicas}-k{learners}"
    cfg = point_config(args, models, root, replicas, learners, variant, name)
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
    ideal, t_s, t_t = ideal_pairs_per_s(args, replicas)
    buf = summary["buffer"]
    row_bytes = buf["bytes"] / max(buf["size"], 1)
    P = args.prompts_per_request
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
        "variant": variant, "replicas": replicas, "learners": learners, "steps": summary["steps"],
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


def fit_costs(results: list[dict]) -> dict:
    """Least-squares per-unit costs over a variant's points: driver CPU s = a * steps + b * requests,
    buffer CPU s = c * seconds + d * rows (c: what the buffer spends per second whatever the rate:
    the per-step calls and this benchmark's stats polling)."""
    import numpy as np

    out = {}
    for v in sorted({r["variant"] for r in results}):
        pts = [r["window"] for r in results if r["variant"] == v]
        if len(pts) < 2:
            continue
        (a, b), *_ = np.linalg.lstsq(np.array([[p["steps"], p["requests"]] for p in pts], float),
                                     np.array([p["driver_cpu_s"] for p in pts]), rcond=None)
        (c, d), *_ = np.linalg.lstsq(np.array([[p["s"], p["rows"]] for p in pts], float),
                                     np.array([p["buffer_cpu_s"] for p in pts]), rcond=None)
        out[v] = {"driver_s_per_step": a, "driver_s_per_request": b, "buffer_s_per_s": c, "buffer_s_per_row": d,
                  "points": len(pts)}
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
        out[f"buffer_actor_{v}"] = 1.0 / max(k["buffer_s_per_row"], 1e-9)
        for P in prompts_per_request:
            out[f"driver_{v}_P{P}"] = 1.0 / (k["driver_s_per_step"] / c["batch"] + k["driver_s_per_request"] / P)
    return out


def print_prediction(pred: dict) -> None:
    gpu = pred["gpu_bound"]
    print(f"prediction, 64 inference + 16 learner A100s, 7B -> 1B (GPU rates assumed, see CLUSTER): GPU-bound "
          f"{gpu:.0f} pairs/s (inference {pred['inference_bound']:.0f}, learners {pred['learner_bound']:.0f})")
    for k, v in pred.items():
        if k not in ("gpu_bound", "inference_bound", "learner_bound", "sampler_gpus"):
            print(f"  ceiling {k:<28} {v:>10.0f} pairs/s  {v / gpu:>6.1f}x GPU-bound")


def print_table(results: list[dict], header: str) -> None:
    print(header)
    cols = ("variant", "R", "K", "ideal p/s", "meas p/s", "eff", "trained p/s", "driver cpu", "buffer cpu", "drv ms/req",
            "buf ms/row", "KB/pair", "buf-node KB", "buf fill", "prompts")
    print(" ".join(f"{c:>10}" for c in cols))
    for r in results:
        print(" ".join(f"{v:>10}" for v in (
            r["variant"], r["replicas"], r["learners"], f"{r['ideal_pairs_s']:.1f}", f"{r['measured_pairs_s']:.1f}",
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
        args.num_prompts, args.sync_size = 256, "none"
    replicas = [int(x) for x in args.replicas.split(",")]
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
        cluster = start_cluster(-(-2 * max(replicas) // 8), args.object_store_mb)
        results, syncs = [], []
        try:
            if args.sync_size != "none":
                syncs = sync_probe(root, args.sync_size, replicas)
                for x in syncs:
                    print(f"[{time.perf_counter() - t0:.0f}s] sync {x['size']} ({x['params'] / 1e6:.1f}M params) "
                          f"to {x['samplers']} samplers on {x['nodes']} nodes: {x['sync_s']:.3f} s",
                          file=sys.stderr, flush=True)
            # every R with one learner rank, then more ranks at the largest R
            points = [(r, 1) for r in replicas] + [(max(replicas), k) for k in learners if k != 1]
            for r, k in points:
                for v in variants:
                    res = run_point(args, models, root, r, k, v, wbytes)
                    results.append(res)
                    print(f"[{time.perf_counter() - t0:.0f}s] {v} R={r} K={k}: {res['measured_pairs_s']:.1f} "
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
        print(f"fit {v} ({c['points']} points): driver {1e3 * c['driver_s_per_step']:.2f} ms/step + "
              f"{1e3 * c['driver_s_per_request']:.2f} ms/request; buffer {c['buffer_s_per_s']:.3f} s/s + "
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
