"""One learner step of a pair loss (DPKD) with each prompt run once for y_t and y_s, against the plain
forward that runs the prompt once per sequence: wall time side by side, in one process, on the same rows.

    python benchmarks/learner_step.py                   # the quickstart's student (8 layers), batch 8, 1 thread
    python benchmarks/learner_step.py --threads 2 --steps 5
    python benchmarks/learner_step.py --tiny            # a random tiny model (the benchmark's own test)

The rows: ``--batch`` prompts of the config's training set (chat template applied, as the run encodes
them), each with a y_t and a y_s of ``--response-tokens`` random tokens (timing does not depend on their
content). A step is what the learner actor does per micro-batch without DeepSpeed: ``compute_loss``,
backward and an AdamW step. The variants alternate step by step, after one warm-up step each, and the
median of each is reported with the ratio. Both variants' losses on the initial weights are printed: they
agree to float rounding (``tests/unit/test_objective.py`` checks log-probs and gradients).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build_rows(prompts: list[list[int]], batch: int, response_tokens: int, vocab: int, seed: int = 0):
    """``batch`` buffer rows on ``prompts`` with random y_t / y_s and flat teacher log-probs."""
    import pyarrow as pa

    from kd.data import BUFFER_SCHEMA

    rng = random.Random(seed)
    rows = []
    for i in range(batch):
        chosen = [rng.randrange(3, vocab) for _ in range(response_tokens)]
        rejected = [rng.randrange(3, vocab) for _ in range(response_tokens)]
        rows.append({"prompt_id": str(i), "prompt_ids": prompts[i % len(prompts)], "teacher_prompt_ids": [1],
                     "chosen_ids": chosen, "rejected_ids": rejected,
                     "chosen_teacher_logps": [-1.0] * response_tokens,
                     "rejected_teacher_logps": [-3.0] * response_tokens,
                     "policy_version": 0, "priming": "none", "created_at": float(i)})
    return pa.Table.from_pylist(rows, schema=BUFFER_SCHEMA)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/quickstart.yaml", help="the student and prompts of this run config")
    ap.add_argument("--loss", default="dpkd", help="a loss that reads both y_t and y_s of every row")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--response-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the online learner's default is 1)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per variant")
    ap.add_argument("--tiny", action="store_true", help="a random tiny student and short random prompts")
    args = ap.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM

    from driver.config import LossConfig
    from kd.objective import compute_loss, resolve_loss, token_counts

    torch.set_num_threads(args.threads)
    scratch = Path(tempfile.mkdtemp(prefix="raykd-learner-step-"))
    if args.tiny:
        from kd.models import make_tiny_model

        path = str(make_tiny_model(scratch / "tiny-student", 2, 0))
        rng = random.Random(1)
        prompts = [[rng.randrange(3, 400) for _ in range(rng.randint(8, 16))] for _ in range(args.batch)]
    else:
        from driver.config import load_config
        from driver.prepare import prepare

        cfg = load_config(args.config)
        prep = prepare(cfg, str(scratch / "run"))
        path, prompts = prep.student_path, [r["prompt_ids"] for r in prep.requests]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    vocab = model.config.vocab_size
    table = build_rows(prompts, args.batch, args.response_tokens, vocab)
    loss_cfg = resolve_loss(LossConfig(type=args.loss))
    counts = token_counts(table, loss_cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    variants = {"prompt once per pair": True, "prompt once per sequence": False}
    times: dict[str, list[float]] = {name: [] for name in variants}
    with torch.no_grad():  # both variants' loss on the same (initial) weights, before any step
        first_loss = {name: compute_loss(model, table, loss_cfg, 0, counts, pair_prompts=paired)[0].item()
                      for name, paired in variants.items()}
    for step in range(args.steps + 1):  # step 0 warms up
        for name, paired in variants.items():
            t = time.perf_counter()
            loss, _ = compute_loss(model, table, loss_cfg, 0, counts, pair_prompts=paired)
            loss.backward()
            opt.step()
            opt.zero_grad()
            if step:
                times[name].append(time.perf_counter() - t)
    width = statistics.mean(len(table.column("prompt_ids")[i].as_py()) for i in range(table.num_rows))
    med = {name: statistics.median(ts) for name, ts in times.items()}
    print(f"{args.loss} step, batch {args.batch} rows (y_t and y_s each), prompts {width:.0f} tokens on average, "
          f"responses {args.response_tokens} tokens, {args.threads} thread(s), {model.num_parameters() / 1e6:.0f}M "
          f"parameters; median of {args.steps} alternating steps:")
    for name, m in med.items():
        print(f"  {name:26s} {m:7.3f} s   (steps: {', '.join(f'{t:.2f}' for t in times[name])}; "
              f"loss on the initial weights {first_loss[name]:.6f})")
    base, new = med["prompt once per sequence"], med["prompt once per pair"]
    print(f"ratio (once per sequence / once per pair): {base / new:.2f}x")
    return {"median_s": med, "steps_s": times, "first_loss": first_loss, "ratio": base / new}


if __name__ == "__main__":
    main()
