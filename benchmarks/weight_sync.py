"""Weight sync from a learner to M student samplers, against the floor of one in-memory copy.

    python benchmarks/weight_sync.py [--sizes 10m,50m,135m] [--samplers 1,2,4] [--repeats 3] [--warmup 2]
                                     [--modes object_store_pickled,object_store,broadcast] [--bucket-mb 64]

For each student size (Llama configs built from a config, random init, no download: 135m is
SmolLM2-135M's shape), one real learner (``LearnerGroup``, K=1, DeepSpeed ZeRO-0, CPU) and up to 4
``StudentSampler`` actors with the HF backend are started; then, for M = 1, 2, 4 samplers, the time of
``WeightSync.push(); wait()`` (learner gathers its state dict, it travels to every sampler, every
sampler loads it into its model) is measured, median of ``--repeats`` after ``--warmup`` untimed
pushes, for each transport:
``object_store_pickled`` (the state dict is the learner's return value, in the object store once,
every sampler fetches it; Ray's default tensor pickling copies on both sides), ``object_store`` (the
same with Ray's zero-copy tensor serialization, which ``LearnerGroup`` turns on by default: samplers
read the tensors straight from shared memory) and ``broadcast`` (a gloo process group from learner
rank 0 to the samplers, ``--bucket-mb`` buckets; NCCL on GPU). Each is shown as a ratio to the floor:
``{k: v.clone()}`` of the same state dict in this process, one thread, as each actor computes with
one thread. All in one run, on this machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

# name -> (vocab, hidden, intermediate, layers, heads, kv heads, tied embeddings)
SHAPES = {
    "10m": (8192, 256, 768, 10, 4, 2, True),
    "50m": (49152, 384, 1024, 20, 6, 2, True),
    "135m": (49152, 576, 1536, 30, 9, 3, True),  # SmolLM2-135M
}


def make_student(name: str, root: Path) -> tuple[Path, int]:
    """A random Llama of shape ``SHAPES[name]`` saved at ``root/name`` (cached); its parameter count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from kd.models import tiny_tokenizer

    vocab, hidden, inter, layers, heads, kv, tied = SHAPES[name]
    out = root / name
    tok = tiny_tokenizer()
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, tie_word_embeddings=tied,
                      max_position_embeddings=2048, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if not (out / "config.json").is_file():
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg)
        model.save_pretrained(out, safe_serialization=True)
        tok.save_pretrained(out)
    with torch.device("meta"):
        n = sum(p.numel() for p in LlamaForCausalLM(cfg).parameters())
    return out, n


def floor_copy(state: dict, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        copy = {k: v.clone() for k, v in state.items()}
        times.append(time.perf_counter() - t)
        del copy
    return statistics.median(times)


def bench_size(name: str, root: Path, counts: list[int], modes: list[str], repeats: int, bucket_mb: float,
               warmup: int):
    import ray

    from actors.learner_group import LearnerGroup
    from actors.student_sampler import StudentSampler
    from actors.weight_sync import WeightSync
    from driver.config import LearnerConfig, LossConfig

    path, n_params = make_student(name, root)
    groups = {zc: LearnerGroup(1, {"num_cpus": 1}, str(path), LearnerConfig(), LossConfig(),
                               name_prefix=f"bench-{name}-{zc}", zero_copy_weights=zc)
              for zc in {m != "object_store_pickled" for m in modes}}
    samplers = [ray.remote(StudentSampler).options(name=f"bench-{name}-sampler-{i}", num_cpus=0.5).remote(
        i, str(path), "hf", {}, {"max_new_tokens": 4}) for i in range(max(counts))]
    ray.get([r for g in groups.values() for r in g.ready_refs()] + [s.ready.remote() for s in samplers])
    shared = ray.get(next(iter(groups.values())).weights_ref())
    state = {k: v.clone() for k, v in shared.items()}  # private memory, touched once: the floor's input
    del shared
    nbytes = sum(v.numel() * v.element_size() for v in state.values())
    floor = floor_copy(state, repeats)
    del state
    rows = []
    version = 0
    for m in counts:
        row = {"size": name, "params": n_params, "mb": nbytes / 2**20, "samplers": m, "floor": floor}
        for mode in modes:
            group = groups[mode != "object_store_pickled"]
            sync = WeightSync(group, samplers[:m], mode=mode.replace("_pickled", ""), bucket_mb=bucket_mb,
                              backend="gloo")
            for _ in range(warmup):  # group set-up (broadcast); first touch of object-store pages
                version += 1
                sync.push(version)
                sync.wait()
            times = []
            for _ in range(repeats):
                version += 1
                sync.push(version)
                times.append(sync.wait())
            row[mode] = statistics.median(times)
        rows.append(row)
        print(_fmt_row(row, modes), flush=True)
    for s in samplers:
        ray.kill(s)
    for g in groups.values():
        g.shutdown()
    return rows


def _header(modes: list[str]) -> str:
    cols = "".join(f"{m + ' s':>{max(len(m) + 4, 12)}}{'x floor':>9}" for m in modes)
    return f"{'student':<8}{'params':>8}{'MB':>7}{'samplers':>9}{'floor copy s':>14}{cols}"


def _fmt_row(r: dict, modes: list[str]) -> str:
    cols = "".join(f"{r[m]:>{max(len(m) + 4, 12)}.3f}{r[m] / r['floor']:>8.1f}x" for m in modes)
    return (f"{r['size']:<8}{r['params'] / 1e6:>7.1f}M{r['mb']:>7.0f}{r['samplers']:>9}"
            f"{r['floor']:>14.3f}{cols}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10m,50m,135m", help=f"any of {','.join(SHAPES)}")
    ap.add_argument("--samplers", default="1,2,4")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2, help="untimed pushes before each measurement")
    ap.add_argument("--modes", default="object_store_pickled,object_store,broadcast")
    ap.add_argument("--bucket-mb", type=float, default=64.0)
    ap.add_argument("--work-dir", default=None, help="where the random students are saved (default: a temp dir)")
    args = ap.parse_args(argv)

    import ray
    import torch

    torch.set_num_threads(1)
    sizes = args.sizes.split(",")
    counts = [int(x) for x in args.samplers.split(",")]
    modes = args.modes.split(",")
    root = Path(args.work_dir or tempfile.mkdtemp(prefix="raykd-bench-"))
    ray.init(address="local", num_cpus=max(counts) + 2, object_store_memory=3 << 30, include_dashboard=False,
             log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}})
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    print(f"weight sync, float32, CPU ({os.cpu_count()} cores), median of {args.repeats} after {args.warmup} "
          f"warm-up pushes; "
          f"broadcast: gloo, {args.bucket_mb:g} MB buckets", flush=True)
    print(_header(modes), flush=True)
    try:
        for name in sizes:
            bench_size(name, root, counts, modes, args.repeats, args.bucket_mb, args.warmup)
    finally:
        ray.shutdown()
    print(f"total {time.perf_counter() - t0:.0f} s; 1-min load average {load_before:.1f} at start, "
          f"{os.getloadavg()[0]:.1f} at end")


if __name__ == "__main__":
    main()
