"""Chunked against unchunked token-level distillation loss: wall time and peak memory of forward+backward.

    python benchmarks/losses.py                       # V=49152, B*T=4096, fkl, the library's chunk size
    python benchmarks/losses.py --loss rkl --topk 20 --chunk-size 512

One run measures both variants side by side on identical inputs (same seed, same shapes) and prints their
ratios. Each variant runs in a fresh subprocess, because torch's CPU allocations are invisible to
tracemalloc and a process's peak RSS never goes down: the peak a variant adds is its
``ru_maxrss`` after forward+backward minus ``ru_maxrss`` once its inputs exist. The first pass gives the
memory (and warms up); wall and process CPU times are each the best of ``--repeats`` further passes
(CPU time is the steadier of the two on a shared machine).

The chunked peak is the [B*T, V] gradient, one chunk's temporaries, and glibc malloc's slack: freed chunk
temporaries stay in the heap for reuse (a few hundred MiB here; MALLOC_TRIM_THRESHOLD_=0 shrinks that, at
the price of page-faulting every chunk afresh, which is slower).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIB = 1024 * 1024


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", "-V", type=int, default=49152, help="vocabulary size V")
    p.add_argument("--tokens", type=int, default=4096, help="B*T positions (all unmasked)")
    p.add_argument("--loss", default="fkl", help="a key of kd.losses.DIVERGENCES, or dpkd_token / sft")
    p.add_argument("--chunk-size", type=int, default=None,
                   help="positions per chunk for the chunked variant (default: kd.losses.DEFAULT_CHUNK_SIZE)")
    p.add_argument("--topk", type=int, default=0, help="teacher as top-k log-probs (0: full logits)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="logits dtype")
    p.add_argument("--repeats", type=int, default=2, help="timed passes per variant, after the first")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: run one variant
    return p.parse_args(argv)


def cpu_seconds() -> float:
    """User + system CPU time of this process: less disturbed than wall time on a shared machine."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def loss_fn(name):
    sys.path.insert(0, ROOT)  # run as a script: make the repository importable
    from kd import losses as L

    if name in L.DIVERGENCES:
        return L.DIVERGENCES[name]
    if name == "dpkd_token":
        return L.dpkd_token_loss
    if name == "sft":
        return L.sft_loss
    raise SystemExit(f"--loss must be one of {', '.join([*L.DIVERGENCES, 'dpkd_token', 'sft'])}; got {name!r}")


def make_inputs(args, n: int, v: int):
    """Seeded student logits [1, n, v] (requiring grad), teacher (logits, TopK, or labels for sft), mask.

    Built a block of rows at a time so that creating them leaves no transient peak in ru_maxrss above
    what stays live (a transient peak would hide part of the loss's own peak)."""
    import torch

    from kd.losses import TopK

    dtype, gen, block = getattr(torch, args.dtype), torch.Generator().manual_seed(0), 256
    student = torch.empty(1, n, v, dtype=dtype)
    for i in range(0, n, block):
        student[0, i:i + block] = torch.randn(min(block, n - i), v, generator=gen).mul_(2)
    full = torch.empty(1, n, v, dtype=dtype) if args.loss != "sft" and not args.topk else None
    parts = []  # small per-block results (labels or top-k) when the teacher is not full logits
    for i in range(0, n, block):
        logits = torch.randn(min(block, n - i), v, generator=gen).mul_(2).to(dtype)
        if full is not None:
            full[0, i:i + block] = logits
        elif args.loss == "sft":
            parts.append((logits.argmax(-1),))
        else:
            vals, ids = logits.float().log_softmax(-1).topk(args.topk, dim=-1)
            parts.append((ids, vals))
    if full is not None:
        teacher = full
    else:
        merged = [torch.cat(cols)[None] for cols in zip(*parts, strict=True)]
        teacher = TopK(*merged) if len(merged) == 2 else merged[0]
    return student.requires_grad_(), teacher, torch.ones(1, n, dtype=torch.bool)


def worker(args) -> dict:
    """One variant in this (fresh) process; prints a JSON line for the parent."""
    import torch

    from kd.losses import DEFAULT_CHUNK_SIZE

    fn = loss_fn(args.loss)
    chunk = None if args.worker == "unchunked" else args.chunk_size or DEFAULT_CHUNK_SIZE
    # A tiny pass first, so that lazily loaded libraries and kernels are not counted as loss memory.
    tiny = make_inputs(args, 8, max(64, args.topk))
    fn(*tiny, chunk_size=None if chunk is None else 4).backward()
    student, teacher, mask = make_inputs(args, args.tokens, args.vocab)
    baseline = max_rss_bytes()

    def step():
        student.grad = None
        loss = fn(student, teacher, mask, chunk_size=chunk)
        loss.backward()
        return loss

    loss = step()
    peak = max_rss_bytes() - baseline
    walls, cpus = [], []
    for _ in range(args.repeats):
        wall, cpu = time.perf_counter(), cpu_seconds()
        step()
        walls.append(time.perf_counter() - wall)
        cpus.append(cpu_seconds() - cpu)
    grad = student.grad.double()
    return {"variant": args.worker, "chunk": chunk, "peak_bytes": peak, "wall_s": min(walls), "cpu_s": min(cpus),
            "loss": loss.item(), "grad_sum": grad.sum().item(), "grad_norm": grad.norm().item(),
            "grad_bytes": student.grad.numel() * student.grad.element_size(), "threads": torch.get_num_threads()}


def run_variant(args, variant: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", variant, "--vocab", str(args.vocab),
           "--tokens", str(args.tokens), "--loss", args.loss, "--topk", str(args.topk), "--dtype", args.dtype,
           "--repeats", str(args.repeats)]
    if args.chunk_size:
        cmd += ["--chunk-size", str(args.chunk_size)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise SystemExit(f"{variant} worker failed (exit {out.returncode}):\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.repeats < 1:
        raise SystemExit("--repeats must be >= 1")
    if args.worker:
        print(json.dumps(worker(args)))
        return
    teacher = f"top-{args.topk} log-probs + tail" if args.topk else "full logits"
    print(f"loss={args.loss}  V={args.vocab}  B*T={args.tokens}  teacher={teacher}  dtype={args.dtype}  "
          f"repeats={args.repeats}")
    rows = [run_variant(args, "unchunked"), run_variant(args, "chunked")]
    print(f"torch threads={rows[0]['threads']}; [B*T, V] gradient itself = {rows[0]['grad_bytes'] / MIB:.0f} MiB "
          f"(part of both peaks)\n")
    print(f"{'variant':<10} {'chunk':>6} {'wall (s)':>9} {'cpu (s)':>8} {'peak extra (MiB)':>17} {'loss':>12}")
    for r in rows:
        print(f"{r['variant']:<10} {str(r['chunk']):>6} {r['wall_s']:>9.3f} {r['cpu_s']:>8.3f} "
              f"{r['peak_bytes'] / MIB:>17.0f} {r['loss']:>12.6f}")
    base, chunked = rows
    print(f"\nratios chunked/unchunked (fwd+bwd): wall time {chunked['wall_s'] / base['wall_s']:.2f}x, "
          f"cpu time {chunked['cpu_s'] / base['cpu_s']:.2f}x, "
          f"peak memory {chunked['peak_bytes'] / max(base['peak_bytes'], 1):.2f}x")
    rel_grad = abs(chunked["grad_norm"] - base["grad_norm"]) / max(base["grad_norm"], 1e-30)
    print(f"agreement: |loss diff| = {abs(chunked['loss'] - base['loss']):.2e}, "
          f"relative grad-norm diff = {rel_grad:.2e}")


if __name__ == "__main__":
    main()
