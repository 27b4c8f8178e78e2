"""Chaos: an online run on tiny models with a random actor killed every N seconds, against the same
run without kills, in one process.

Prints kills survived, prompts lost (taken from the stream but never in the buffer), duplicates
(a prompt in the buffer twice in one epoch), buffer rows lost with a dead buffer (bounded by the rows
since the last checkpoint), learner restarts, and wall time as a ratio to the run without kills.

    python benchmarks/chaos.py [--steps 60] [--every 4] [--seed 0]

``--node-loss ROLE`` instead: a 3-node local cluster (``ray.cluster_utils.Cluster``; custom resources
spread teachers, sampler and learner over the nodes), and the node holding ROLE's actor is removed once
training runs. The run either completes (what it lost is printed) or stops with the one-line message
naming what the remaining nodes cannot hold.

    python benchmarks/chaos.py --node-loss teacher|sampler|learner [--steps 30]
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import ray

VICTIMS = ("teacher-0", "teacher-1", "sampler-0", "replay-buffer", "learner-0")


def make_config(models: dict, steps: int, run_dir: Path, extra: list[str] = ()):
    from driver.config import load_config

    return load_config(None, [
        f"models.teacher={models['teacher']}", f"models.student={models['student']}",
        "data.num_prompts=400", "teacher.max_new_tokens=8", "sampler.max_new_tokens=8",
        "teacher.top_k_logprobs=2", "teacher.num_replicas=2", "sampler.prompts_per_request=4",
        "teacher.engine.backend=hf", "sampler.engine.backend=hf", "buffer.capacity=128",
        "learner.batch_size=4", "learner.lr=1e-3", "sync.every_steps=2", f"learner.max_steps={steps}",
        "checkpoint.every_steps=4", "checkpoint.export_hf=false", "learner.max_restarts=100",
        f"run.runs_dir={run_dir}", "ray.num_cpus=8", *extra])


def run_once(cfg, run_dir: Path, every: float | None, rng: random.Random) -> dict:
    from driver.online import run_online
    from driver.prepare import prepare

    prep = prepare(cfg, str(run_dir))
    kills: list[str] = []
    stop = threading.Event()

    def chaos():
        metrics = run_dir / "metrics.jsonl"
        while not stop.wait(every):
            done = len(metrics.read_text().splitlines()) if metrics.exists() else 0
            if not 0 < done < cfg.learner.max_steps - 2:  # kills land while training runs
                continue
            name = rng.choice(VICTIMS)
            try:
                ray.kill(ray.get_actor(name), no_restart=False)
                kills.append(name)
            except ValueError:  # not (yet) there, e.g. being re-created
                pass

    killer = threading.Thread(target=chaos, daemon=True) if every else None
    t = time.perf_counter()
    if killer:
        killer.start()
    try:
        summary = run_online(cfg, prep, progress=False)
    finally:
        stop.set()
    wall = time.perf_counter() - t
    lines = (run_dir / "consumed.jsonl").read_text().splitlines()
    seen = Counter((x["epoch"], pid) for x in map(json.loads, lines) for pid in x["prompt_ids"])
    return {"wall_s": wall, "kills": kills, "steps": summary["steps"],
            "prompts_lost": summary["prompts_requested"] - sum(seen.values()),
            "duplicates": sum(n - 1 for n in seen.values() if n > 1),
            "buffer_rows_lost": summary["buffer_rows_lost"], "learner_restarts": summary["learner_restarts"],
            "recovered_requests": summary["recovered_requests"], "buffer_restores": summary["buffer_restores"],
            "lost_actors": sorted(summary.get("lost_actors", {}))}


# Node resources: teacher-0 on `a` or `c`, teacher-1 on the other, sampler on `a`, learner on `b`; none of
# them fits anywhere else once its node is gone (the `t` slots left are held by the other teacher).
NODES = {"a": {"t": 1, "s": 1}, "b": {"l": 1}, "c": {"t": 1}}


def node_loss(models: dict, role: str, steps: int, root: Path) -> None:
    from ray.cluster_utils import Cluster

    from kd.errors import UserInputError

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    nodes = {k: cluster.add_node(num_cpus=3, resources=v) for k, v in NODES.items()}
    ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
    cfg = make_config(models, steps, root, ["teacher.engine.resources={t: 1}", "sampler.engine.resources={s: 1}",
                                            "learner.resources={l: 1}", "ray.num_cpus=null"])
    run_dir = root / f"node-loss-{role}"
    removed: list[str] = []

    def remove_node():
        from ray._private.state import actors

        metrics = run_dir / "metrics.jsonl"
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 6):
            time.sleep(0.2)
        where = {x["Name"]: x["Address"]["NodeID"] for x in actors().values() if x["State"] == "ALIVE"}
        victim = f"{role}-0" if role != "teacher" else next(f"teacher-{i}" for i in (0, 1)
                                                           if where.get(f"teacher-{i}") != nodes["a"].node_id)
        key = next(k for k, n in nodes.items() if n.node_id == where[victim])
        cluster.remove_node(nodes[key])
        removed.append(f"node {key} (with {victim}) after step {len(metrics.read_text().splitlines())}")

    threading.Thread(target=remove_node, daemon=True).start()
    t = time.perf_counter()
    try:
        result = run_once(cfg, run_dir, None, random.Random(0))
        outcome = f"completed {result['steps']} steps"
    except UserInputError as e:
        result, outcome = None, f"stopped: raykd: error: {e}"
    finally:
        ray.shutdown()
        cluster.shutdown()
    print(f"\nremoved {', '.join(removed) or 'nothing'}; {outcome} ({time.perf_counter() - t:.0f} s)")
    report = {"role": role, "removed": removed, "outcome": outcome, "wall_s": round(time.perf_counter() - t, 1)}
    if result:
        report.update({k: result[k] for k in ("steps", "prompts_lost", "duplicates", "buffer_rows_lost",
                                              "recovered_requests", "lost_actors")},
                      summary_written=(run_dir / "summary.json").is_file(),
                      final_written=(run_dir / "final" / "config.json").is_file())
    print(json.dumps(report))  # the last line: what a test reads


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--every", type=float, default=4.0, help="seconds between kills")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--node-loss", choices=("teacher", "sampler", "learner"), default=None)
    args = ap.parse_args()

    from kd.models import make_tiny_model

    root = Path(tempfile.mkdtemp(prefix="raykd-chaos-"))
    models = {"teacher": str(make_tiny_model(root / "teacher", 4, 0)),
              "student": str(make_tiny_model(root / "student", 2, 1))}
    if args.node_loss:
        node_loss(models, args.node_loss, args.steps, root)
        return
    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        # warm-up (unmeasured): the first run in a cluster also pays for starting worker processes
        run_once(make_config(models, 4, root), root / "warmup", None, random.Random(args.seed))
        calm = run_once(make_config(models, args.steps, root), root / "calm", None, random.Random(args.seed))
        wild = run_once(make_config(models, args.steps, root), root / "chaos", args.every,
                        random.Random(args.seed))
    finally:
        ray.shutdown()
    print(f"\n{'':<22}{'no kills':>12}{'kills':>12}")
    for key in ("steps", "prompts_lost", "duplicates", "buffer_rows_lost", "learner_restarts", "buffer_restores"):
        print(f"{key:<22}{calm[key]:>12}{wild[key]:>12}")
    print(f"{'wall s':<22}{calm['wall_s']:>12.1f}{wild['wall_s']:>12.1f}")
    print(f"\nkills survived: {len(wild['kills'])} ({', '.join(wild['kills']) or 'none'})")
    print(f"requests re-sent: {wild['recovered_requests']}")
    print(f"wall time with kills / without: {wild['wall_s'] / calm['wall_s']:.2f}x")


if __name__ == "__main__":
    main()
