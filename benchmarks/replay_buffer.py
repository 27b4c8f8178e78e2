"""Replay-buffer throughput: insert + sample rows/s, in-process and through the Ray actor, as ratios
to a bare ``pyarrow.concat_tables`` of the same rows (the floor: no bookkeeping at all).

Rows are sized like real ones: prompt 128 tokens, responses 256, teacher top-k 20 at every
response position (both sides), per-token log-probs.

    python benchmarks/replay_buffer.py [--rows 4096] [--batch 64] [--capacity 2048]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pyarrow as pa

from kd.data import BUFFER_SCHEMA


def make_batch(n: int, prompt: int, resp: int, k: int, seed: int, version: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)

    def ids(length):
        return [rng.integers(0, 49152, length, dtype=np.int32).tolist() for _ in range(n)]

    def lps(length):
        return [(-rng.random(length, dtype=np.float32) * 5).tolist() for _ in range(n)]

    def topk_ids():
        return [rng.integers(0, 49152, (resp, k), dtype=np.int32).tolist() for _ in range(n)]

    def topk_lps():
        return [np.sort(-rng.random((resp, k), dtype=np.float32) * 8, axis=1)[:, ::-1].tolist() for _ in range(n)]

    return pa.Table.from_pydict({
        "prompt_id": [f"p{seed}-{i}" for i in range(n)], "prompt_ids": ids(prompt), "teacher_prompt_ids": ids(prompt),
        "chosen_ids": ids(resp), "rejected_ids": ids(resp), "chosen_teacher_logps": lps(resp),
        "rejected_teacher_logps": lps(resp), "chosen_topk_ids": topk_ids(), "chosen_topk_logps": topk_lps(),
        "rejected_topk_ids": topk_ids(), "rejected_topk_logps": topk_lps(),
        "rejected_behaviour_logps": lps(resp), "policy_version": [version] * n, "priming": ["none"] * n,
        "created_at": [0.0] * n, "reference_answer": ["42"] * n, "teacher_name": [None] * n,
        "chosen_teacher_logp_sum": [None] * n, "rejected_teacher_logp_sum": [None] * n,
    }, schema=BUFFER_SCHEMA)


def bench_floor(batches: list[pa.Table]) -> float:
    t = time.perf_counter()
    table = pa.concat_tables(batches)  # zero-copy: only chunk bookkeeping
    assert table.num_rows == sum(b.num_rows for b in batches)
    return time.perf_counter() - t


def bench_copy_floor(batches, batch: int) -> float:
    """concat + take() of the same rows a FIFO learner would get: the least any buffer that hands out
    rows (rather than views) must do."""
    t = time.perf_counter()
    table = pa.concat_tables(batches)
    for start in range(0, table.num_rows, batch):
        out = table.take(pa.array(np.arange(start, start + batch)))
        assert out.num_rows == batch
    return time.perf_counter() - t


def bench_core(batches, capacity: int, batch: int) -> float:
    from actors.replay_buffer import BufferCore

    buf = BufferCore(capacity, max_policy_lag=4)
    t = time.perf_counter()
    for b in batches:
        buf.add(b)
        out = buf.sample(batch, 0)
        assert out is not None and out.num_rows == batch
    return time.perf_counter() - t


def bench_actor(batches, capacity: int, batch: int) -> float:
    import ray

    from actors.replay_buffer import ReplayBuffer

    buf = ray.remote(ReplayBuffer).options(max_concurrency=8).remote(capacity, 4)
    ray.get(buf.ready.remote())
    refs = [ray.put(b) for b in batches]  # producers hand over tables already in the object store
    t = time.perf_counter()
    for r in refs:
        ray.get(buf.add.remote(r))
        out = ray.get(buf.sample.remote(batch, 0))
        assert out.num_rows == batch
    dt = time.perf_counter() - t
    ray.kill(buf)
    return dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--capacity", type=int, default=1024)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--response", type=int, default=256)
    ap.add_argument("--top-k", type=int, default=20)
    args = ap.parse_args()

    import ray

    n_batches = args.rows // args.batch
    print(f"building {n_batches} batches of {args.batch} rows "
          f"(prompt {args.prompt}, responses {args.response}, top-k {args.top_k}) ...")
    batches = [make_batch(args.batch, args.prompt, args.response, args.top_k, seed=i) for i in range(n_batches)]
    mb = sum(b.nbytes for b in batches) / 2**20
    print(f"{mb:.0f} MiB of rows, {mb / args.rows * 1024:.0f} KiB per row")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        rows = n_batches * args.batch
        floor = bench_floor(batches)
        copy_floor = bench_copy_floor(batches, args.batch)
        core = bench_core(batches, args.capacity, args.batch)
        actor = bench_actor(batches, args.capacity, args.batch)
    finally:
        ray.shutdown()
    print("(the floor is a zero-copy concat; the buffer also copies every sampled row out with take())")
    print(f"\n{'path':<36}{'seconds':>10}{'rows/s':>12}{'x floor':>10}{'x copy floor':>14}")
    for name, dt in (("pyarrow.concat_tables (floor)", floor), ("concat + take (copy floor)", copy_floor),
                     ("BufferCore in-process add+sample", core), ("ReplayBuffer actor add+sample", actor)):
        print(f"{name:<36}{dt:>10.3f}{rows / dt:>12.0f}{dt / floor:>10.0f}{dt / copy_floor:>14.2f}")


if __name__ == "__main__":
    main()
