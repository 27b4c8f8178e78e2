"""vLLM against the HF reference engine, side by side in one run, on the same model and prompts.

    python benchmarks/engines.py [--model tiny|smollm2-135m-instruct] [--batch-sizes 1,8,32]
                                 [--max-new-tokens 32] [--top-k 20] [--threads N] [--repeats 2]
                                 [--score-lengths 128,1024,4096 --score-batch 4]

Prints, per batch size: generation tokens/s (sampling at temperature 1, new tokens per second) and
scoring tokens/s (teacher-forced log-probs plus top-k of continuation tokens per second), for both
engines, with the vLLM/HF ratio; with ``--score-lengths``, the two scoring paths (vLLM's
``prompt_logprobs`` against a torch forward with ``torch.topk``, the HF engine) as the scored text
grows; then the time of a vLLM weight update against copying the same
state dict in memory (``{k: v.clone()}``). Both engines share this process's torch thread pool, so
they compute on the same number of cores. Prompts are ``kd.data.synthetic_math`` questions in the
model's chat template.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout


def chat_prompts(model_path, n: int) -> list[list[int]]:
    from transformers import AutoTokenizer

    from kd.data import synthetic_math

    tok = AutoTokenizer.from_pretrained(model_path)
    out = []
    for row in synthetic_math(n, seed=0):
        msgs = [{"role": "user", "content": row["question"]}]
        enc = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True)
        out.append(list(enc["input_ids"]))
    return out


def timed(fn, *args, **kwargs):
    t = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - t


def bench_batch(engines: dict, prompts, max_new_tokens: int, top_k: int, repeats: int) -> dict:
    """Tokens/s of generate and score for each engine on one batch, best of ``repeats`` runs (the
    engines alternate, so background load on a shared machine hits both alike). Both engines score
    the same continuations (the HF engine's samples), so they do identical work."""
    from actors.engines.base import SamplingParams

    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=1.0, seed=0)
    rates: dict = {}
    conts = None
    for _ in range(repeats):
        for name, engine in engines.items():
            gens, dt = timed(engine.generate, prompts, params)
            rate = sum(len(g.token_ids) for g in gens) / dt
            rates[("generate", name)] = max(rate, rates.get(("generate", name), 0.0))
            if conts is None:
                conts = [g.token_ids for g in gens]
    n_cont = sum(len(c) for c in conts)
    for _ in range(repeats):
        for name, engine in engines.items():
            _, dt = timed(engine.score, prompts, conts, top_k)
            rates[("score", name)] = max(n_cont / dt, rates.get(("score", name), 0.0))
    return rates


def bench_score_lengths(engines: dict, prompts, lengths: list[int], batch: int, top_k: int,
                        repeats: int) -> dict:
    """Scoring tokens/s of each engine for continuations of each length (``batch`` prompts, best of
    ``repeats``): the two scoring paths on this backend, vLLM's ``prompt_logprobs`` (a top-k over the
    vocabulary at every position inside vLLM) and a plain torch forward with ``torch.topk`` (the HF
    engine), as the scored text grows. The continuations are the prompts' own tokens repeated."""
    rates: dict = {}
    for length in lengths:
        ps = prompts[:batch]
        conts = [(p * (length // len(p) + 1))[:length] for p in ps]
        for _ in range(repeats):
            for name, engine in engines.items():
                _, dt = timed(engine.score, ps, conts, top_k)
                rates[(length, name)] = max(batch * length / dt, rates.get((length, name), 0.0))
    return rates


def bench_weight_update(engines: dict, model_path, repeats: int = 3) -> dict:
    """Best-of-``repeats`` seconds: an in-memory copy of the state dict, and each engine's
    update_weights of that same state dict."""
    import torch
    from transformers import AutoModelForCausalLM

    weights = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).state_dict()
    times = {"copy": min(timed(lambda: {k: v.clone() for k, v in weights.items()})[1]
                         for _ in range(repeats))}
    for name, engine in engines.items():
        times[name] = min(timed(engine.update_weights, weights, i + 1)[1] for i in range(repeats))
    return times


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default="smollm2-135m-instruct",
                    help="tiny | smollm2-135m-instruct | a Hugging Face model directory")
    ap.add_argument("--batch-sizes", default="1,8,32")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--top-k", type=int, default=20, help="top-k returned by score()")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: all allowed)")
    ap.add_argument("--repeats", type=int, default=2, help="best of N runs per measurement")
    ap.add_argument("--score-lengths", default="",
                    help="also score continuations of these lengths (e.g. 128,1024,4096), batch "
                         "--score-batch: where each scoring path is faster as the text grows")
    ap.add_argument("--score-batch", type=int, default=4)
    args = ap.parse_args(argv)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    lengths = [int(x) for x in args.score_lengths.split(",") if x]

    import torch

    from actors.engines.base import SamplingParams
    from actors.engines.hf_engine import HFEngine
    from actors.engines.vllm_engine import VLLMEngine
    from kd.models import resolve_model

    path = resolve_model(args.model)
    load_before = os.getloadavg()[0]
    vllm_engine, t_vllm = timed(VLLMEngine, path, num_threads=args.threads,
                                max_logprobs=max(20, args.top_k),
                                max_model_len=max([2048, *(n + 256 for n in lengths)]))
    hf_engine, t_hf = timed(HFEngine, path)  # after vLLM: it shares the thread count vLLM set
    engines = {"hf": hf_engine, "vllm": vllm_engine}
    prompts = chat_prompts(path, max(batch_sizes))
    for engine in engines.values():  # warm-up: first-call allocations and lazy init
        engine.generate(prompts[:2], SamplingParams(max_new_tokens=4))
        engine.score(prompts[:2], [[1, 2], [3]], args.top_k)

    rows = [(b, bench_batch(engines, prompts[:b], args.max_new_tokens, args.top_k, args.repeats))
            for b in batch_sizes]
    by_length = bench_score_lengths(engines, prompts, lengths, args.score_batch, args.top_k, args.repeats)
    upd = bench_weight_update(engines, path)

    mean_prompt = sum(len(p) for p in prompts) / len(prompts)
    print(f"\nmodel {args.model}  dtype float32  threads {torch.get_num_threads()}  "
          f"max_new_tokens {args.max_new_tokens}  top_k {args.top_k}  "
          f"mean prompt {mean_prompt:.0f} tokens  best of {args.repeats}")
    # other work on the machine skews both engines' rates; the load average shows how much there was
    print(f"1-min load average: {load_before:.1f} at start, {os.getloadavg()[0]:.1f} at end "
          f"({os.cpu_count()} CPUs)")
    print(f"engine start-up: vLLM {t_vllm:.1f} s, HF {t_hf:.1f} s")
    print(f"\n{'call':<10}{'batch':>6}{'HF tok/s':>12}{'vLLM tok/s':>12}{'vLLM/HF':>10}")
    for call in ("generate", "score"):
        for b, r in rows:
            hf, vl = r[(call, "hf")], r[(call, "vllm")]
            print(f"{call:<10}{b:>6}{hf:>12.1f}{vl:>12.1f}{vl / hf:>9.2f}x")
    if lengths:
        print(f"\nscoring {args.score_batch} continuations of each length (tokens/s, top-{args.top_k}):")
        print(f"{'length':>8}{'HF forward+topk':>18}{'vLLM prompt_logprobs':>22}{'vLLM/HF':>10}")
        for n in lengths:
            hf, vl = by_length[(n, "hf")], by_length[(n, "vllm")]
            print(f"{n:>8}{hf:>18.1f}{vl:>22.1f}{vl / hf:>9.2f}x")
    print(f"\nweight update (best of 3): in-memory copy {upd['copy'] * 1e3:.1f} ms, "
          f"vLLM update_weights {upd['vllm'] * 1e3:.1f} ms ({upd['vllm'] / upd['copy']:.1f}x copy), "
          f"HF update_weights {upd['hf'] * 1e3:.1f} ms ({upd['hf'] / upd['copy']:.1f}x copy)")


if __name__ == "__main__":
    main()
