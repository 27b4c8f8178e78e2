"""What each distillation method buys: a fixed grid of methods at an equal budget, every final student
scored on held-out prompts that no method trains on.

    python benchmarks/quality.py                                  # the whole grid, seeds 0,1,2
    python benchmarks/quality.py --quick                          # 4 methods, 1 seed, few steps
    python benchmarks/quality.py --gsm8k ../shared/data/gsm8k/train.jsonl   # also score on GSM8K

Setting (the embedded default): teacher SmolLM2-135M-Instruct, student its 5-layer truncation (layers 0,
7, 14, 21, 29), training prompts from the built-in synthetic math generator (seed = the run's seed).
Held out: synthetic math problems from another generator seed (``driver.evaluate.HELD_OUT_SEED``) and,
with ``--gsm8k``, the LAST ``--gsm8k-limit`` questions of a GSM8K JSONL file (no method trains on GSM8K).

Equal budget: every method trains on ``--steps`` x ``learner.batch_size`` samples with the same learning
rate, warm-up and batch. Offline methods cycle over one teacher dataset per seed (``data.num_prompts``
responses, generated once and shared; its generation time is added to each offline method's wall time,
its tokens to each one's teacher tokens). ``seqkd_then_dpkd`` spends half its steps on each phase. ``dpkd``
and ``seqkd_then_dpkd`` take y_t from that dataset (``teacher_answers``) and are charged for it likewise.

Scores per final student: exact match and Rouge-L against the reference solutions on each held-out set,
and ``KL(teacher||student)`` / ``KL(student||teacher)`` teacher-forced on the held-out reference
solutions (full vocabulary). Greedy decoding, on one vLLM engine that each student's weights are loaded into
(``--eval-backend hf``: a fresh HF engine per student). Writes ``--out`` (default docs/results.md): the
table (mean and sample std over seeds), a plot of score against wall time per method (PNG beside it) and
the raw per-run results (JSON beside it). A finished run is not redone when the command is re-run with
the same ``--work`` directory.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml  # noqa: E402

DPKD_PRIMINGS = ("teacher", "ground_truth", "confidence", "cot", "answer_hint")
QUICK = ("initial", "seqkd", "gkd_jsd", "dpkd")


def base_config(tiny: dict | None) -> dict:
    """The shared setting; ``tiny`` (model paths) shrinks it to random tiny models for tests."""
    cfg = {
        "models": {"teacher": "smollm2-135m-instruct", "student_keep_layers": [0, 7, 14, 21, 29]},
        "data": {"source": "synthetic_math", "num_prompts": 128, "max_prompt_tokens": 128},
        "teacher": {"max_new_tokens": 64, "top_k_logprobs": 8, "temperature": 0.7},
        "sampler": {"max_new_tokens": 48, "prompts_per_request": 8},
        "buffer": {"capacity": 256},
        # (offline methods: learner.offline_torch_threads 'auto', the default, gives the learner every core)
        # 8 steps x 8 samples per method (--steps): the grid of 3 seeds fits ~90 minutes on 2 cores
        "learner": {"batch_size": 8, "lr": 3.0e-4, "warmup_steps": 2},
        "sync": {"every_steps": 2},
        "checkpoint": {"export_hf": False},
    }
    if tiny:
        cfg["models"] = {"teacher": tiny["teacher"], "student": tiny["student"], "student_keep_layers": None}
        cfg["data"]["num_prompts"] = 16
        cfg["teacher"].update(max_new_tokens=6, top_k_logprobs=4, engine={"backend": "hf"})
        cfg["sampler"].update(max_new_tokens=6, prompts_per_request=4, engine={"backend": "hf"})
        cfg["learner"].update(batch_size=4, warmup_steps=0)
    return cfg


def methods(steps: int) -> dict[str, list | None]:
    """Each method's schedule (None: no training). 'TEACHER' / 'REFERENCE' stand for the shared
    teacher dataset and the reference-solution dataset of the seed."""
    half = max(1, steps // 2)

    def off(loss, data="TEACHER", n=steps):
        return {"kind": "offline", "steps": n, "data": data, "loss": loss}

    def on(loss, n=steps, answers=None):
        return {"kind": "online", "steps": n, "loss": loss, **({"teacher_answers": answers} if answers else {})}

    grid = {
        "initial": None,
        "sft_ground_truth": [off({"type": "sft"}, "REFERENCE")],
        "seqkd": [off({"type": "sft"})],
        "offline_topk_fkl": [off({"type": "fkl"})],
        "dpkd_token": [off({"type": "dpkd_token"})],  # reads only y_t and its top-k: offline rows
        "gkd_jsd": [on({"type": "jsd"})],
        "pg_rkl": [on({"type": "pg_rkl"})],
        # y_t of the seed's teacher dataset (schedule[i].teacher_answers): the teacher only scores y_s
        "dpkd": [on({"type": "dpkd"}, answers="TEACHER")],
        "seqkd_then_dpkd": [off({"type": "sft"}, n=half), on({"type": "dpkd"}, n=steps - half, answers="offline")],
    }
    grid.update({f"dpkd+{s}": [on({"type": "dpkd"})] for s in DPKD_PRIMINGS})  # y_t from primed prompts
    return grid


def uses(schedule, dataset: str) -> bool:
    """Whether a method's schedule reads the seed's shared dataset ``dataset`` (TEACHER or REFERENCE)."""
    return any(dataset in (p.get("data"), p.get("teacher_answers")) for p in schedule or [])


def _resolved(phase: dict, data: dict) -> dict:
    """A grid phase with its dataset placeholders replaced by the seed's directories."""
    return {k: str(data[v]) if k in ("data", "teacher_answers") and v in data else v for k, v in phase.items()}


# ---------------------------------------------------------------------------------------------
# Datasets shared by the offline methods of one seed
# ---------------------------------------------------------------------------------------------


def teacher_dataset(base: dict, seed: int, work: Path) -> tuple[Path, dict]:
    """The seed's teacher dataset (generated once; resumable) and what it cost."""
    from driver.config import load_config
    from driver.offline import generate_dataset

    out = work / f"teacher-data-s{seed}"
    cost_file = out / "cost.json"
    if cost_file.is_file():
        return out, json.loads(cost_file.read_text())
    cfg = load_config(_write_yaml(work / f"gen-s{seed}.yaml", {**base, "run": {"seed": seed}}))
    t = time.perf_counter()
    generate_dataset(cfg, out, progress=False)
    from driver.offline import read_dataset

    tokens = sum(map(len, read_dataset(out).column("chosen_ids").to_pylist()))
    cost = {"wall_s": time.perf_counter() - t, "teacher_tokens": tokens}
    cost_file.write_text(json.dumps(cost))
    return out, cost


def reference_dataset(cfg, prep, seed: int, work: Path) -> Path:
    """SFT on ground truth: the reference solutions of the training prompts as offline rows (y_t =
    the solution text; no teacher log-probs, which SFT does not read)."""
    import pyarrow as pa

    from driver.offline import MANIFEST, _write_shard, shard_name, teacher_stamp
    from kd.data import BUFFER_SCHEMA, synthetic_math

    out = work / f"reference-data-s{seed}"
    if (out / MANIFEST).is_file():
        return out
    solutions = {r["id"]: r["answer"] for r in synthetic_math(cfg.data.num_prompts, cfg.run.seed)}
    tok = prep.tokenizer
    rows = []
    for r in prep.requests:
        ids = tok.encode(solutions[r["prompt_id"]], add_special_tokens=False) + [tok.eos_token_id]
        rows.append({"prompt_id": r["prompt_id"], "prompt_ids": r["prompt_ids"],
                     "teacher_prompt_ids": r["prompt_ids"], "chosen_ids": ids, "rejected_ids": [],
                     "chosen_teacher_logps": [], "rejected_teacher_logps": [], "policy_version": -1,
                     "priming": "none", "created_at": 0.0, "reference_answer": r["reference_answer"]})
    out.mkdir(parents=True, exist_ok=True)
    _write_shard(out / shard_name(0), [pa.Table.from_pylist(rows, schema=BUFFER_SCHEMA)])
    stamp = teacher_stamp("reference solutions", prep.student_path, tok)  # the tokenizer that wrote the ids
    (out / MANIFEST).write_text(json.dumps({"identity": {"teacher": "reference solutions"}, "teacher_model": stamp}))
    return out


# ---------------------------------------------------------------------------------------------
# Scoring a final student
# ---------------------------------------------------------------------------------------------


class Scorer:
    """Held-out sets (prompts formatted as in training) and the teacher, loaded once."""

    def __init__(self, cfg, tokenizer, teacher_path: str, gsm8k: str | None, gsm8k_limit: int, limit: int,
                 backend: str = "vllm"):
        from driver.evaluate import HELD_OUT_SEED, Example, encode_prompts, load_examples
        from kd.metrics import extract_answer

        self.tok, self.teacher, self.reference = tokenizer, teacher_path, None
        self.backend, self.engine, self.engine_model = backend, None, None
        self.sets = {"synth": load_examples("synthetic_math", limit=limit, seed=HELD_OUT_SEED)}
        if gsm8k:
            lines = [ln for ln in Path(gsm8k).read_text().splitlines() if ln.strip()][-gsm8k_limit:]
            rows = [json.loads(ln) for ln in lines]
            self.sets["gsm8k"] = [Example(f"gsm8k-heldout-{i}", r["question"], r["answer"], extract_answer(r["answer"]))
                                  for i, r in enumerate(rows)]
        self.prompts = {k: encode_prompts(tokenizer, ex, cfg.data.system_prompt, cfg.data.chat_template,
                                          cfg.data.max_prompt_tokens) for k, ex in self.sets.items()}

    def _engine(self, model_dir: str, max_new_tokens: int):
        """The greedy generator for ``model_dir``. With vLLM one engine serves every student: a new
        student's weights are loaded into it in place (they share one architecture), which saves an
        engine start per run; the teacher, another architecture, gets an engine of its own."""
        from actors.engines import make_engine

        if self.backend == "hf":
            return make_engine("hf", model_dir)
        config = json.loads((Path(model_dir) / "config.json").read_text())
        arch = {k: config.get(k) for k in ("architectures", "num_hidden_layers", "hidden_size", "vocab_size")}
        if self.engine is None or self.engine_model != arch:
            self.engine = None  # the old engine's memory goes before the new one takes its own
            longest = max(len(p) for ps in self.prompts.values() for p in ps)
            self.engine = make_engine("vllm", model_dir, max_model_len=longest + max_new_tokens, kv_cache_gb=0.5)
            self.engine_model = arch
        else:
            from transformers import AutoModelForCausalLM

            weights = AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32").state_dict()
            self.engine.update_weights(weights, self.engine.version + 1)
        return self.engine

    def score(self, model_dir: str, max_new_tokens: int, kl: bool = True) -> dict:
        from actors.engines import SamplingParams
        from driver.evaluate import TeacherReference, evaluate

        engine = self._engine(model_dir, max_new_tokens)
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)

        def generate(batch, seed=None):
            return [g.token_ids for g in engine.generate(batch, params)]

        out, prompts, conts = {}, [], []
        self.answers = {}  # the last student's greedy answers per held-out set
        for name, examples in self.sets.items():
            done = evaluate(generate, self.tok, examples, self.prompts[name], batch_size=32,
                            max_new_tokens=max_new_tokens)
            m, self.answers[name] = done["metrics"], [r["prediction"] for r in done["examples"]]
            out[f"{name}_exact_match"], out[f"{name}_rouge_l"] = m["exact_match"], m["rouge_l"]
            prompts += self.prompts[name]
            conts += [self.tok.encode(ex.reference, add_special_tokens=False) for ex in examples]
        if kl:
            if self.reference is None:  # the teacher's side of every KL, computed once for all students
                self.reference = TeacherReference(self.teacher, prompts, conts)
            k = self.reference.kl(model_dir)
            out.update(kl_teacher_student=k["kl_teacher_student"], kl_student_teacher=k["kl_student_teacher"])
        return out


# ---------------------------------------------------------------------------------------------
# The grid
# ---------------------------------------------------------------------------------------------


def _fresh(path: Path) -> Path:
    """A scratch run directory, emptied (raykd refuses to start a run in an existing one)."""
    import shutil

    shutil.rmtree(path, ignore_errors=True)
    return path


def _write_yaml(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def run_one(name: str, schedule, base: dict, seed: int, work: Path, data: dict, scorer, max_new: int) -> dict:
    """Train one (method, seed) and score its final student; cached in work/<name>-s<seed>/result.json."""
    from driver.config import load_config
    from driver.online import run_online
    from driver.prepare import prepare

    run_dir = work / f"{name}-s{seed}"
    done = run_dir / "result.json"
    if done.is_file():
        return json.loads(done.read_text())
    result = {"method": name, "seed": seed, "wall_s": 0.0, "teacher_tokens": 0, "steps": 0}
    started = time.perf_counter()
    if schedule is None:
        model = data["student_path"]
    else:
        sched = [_resolved(p, data) for p in schedule]
        extra, run_name = {}, re.sub(r"[^A-Za-z0-9._-]", "_", name)  # run.name allows no '+'
        if name.startswith("dpkd+"):
            extra["priming"] = {"strategy": name.split("+", 1)[1]}
        cfg = load_config(_write_yaml(work / f"{name}-s{seed}.yaml",
                                      {**base, **extra, "run": {"name": run_name, "seed": seed}, "schedule": sched}))
        summary = run_online(cfg, prepare(cfg, str(_fresh(run_dir))), progress=False)  # redo an unfinished one
        model = summary["final_model"]
        uses_teacher_data = uses(schedule, "TEACHER")
        generated = sum(t.get("generated_tokens", 0) for t in summary["teachers"])
        result.update(steps=summary["steps"], wall_s=summary["wall_s"], loop_s=summary["wall_s"],
                      teacher_generated_tokens=generated,
                      teacher_tokens=generated + sum(t.get("scored_tokens", 0) for t in summary["teachers"]))
        if uses_teacher_data:
            result["wall_s"] += data["teacher_cost"]["wall_s"]
            result["teacher_tokens"] += data["teacher_cost"]["teacher_tokens"]
            result["teacher_generated_tokens"] += data["teacher_cost"]["teacher_tokens"]
    result["run_s"] = time.perf_counter() - started  # config to final model: actors' start and stop included
    result.update(scorer.score(model, max_new))
    result["score_s"] = time.perf_counter() - started - result["run_s"]
    done.parent.mkdir(parents=True, exist_ok=True)
    done.write_text(json.dumps(result, indent=1))
    # scored: the run's resume checkpoints (~0.3 GB each here) are of no further use; the final model,
    # metrics and summary stay. Kept, a 3-seed grid filled 27 GB and then the disk.
    import shutil

    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    return result


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------

COLUMNS = [("synth_exact_match", "synth EM"), ("synth_rouge_l", "synth Rouge-L"),
           ("gsm8k_exact_match", "GSM8K EM"), ("gsm8k_rouge_l", "GSM8K Rouge-L"),
           ("kl_teacher_student", "KL(t‖s)"), ("kl_student_teacher", "KL(s‖t)"),
           ("wall_s", "wall s"), ("teacher_tokens", "teacher tokens")]


def setting(base: dict) -> str:
    """The benchmark's setting in words, from the config every method shares."""
    t, smp, ln = base["teacher"], base["sampler"], base["learner"]
    layers = base["models"].get("student_keep_layers")
    student = (f"its {len(layers)}-layer truncation (layers {', '.join(map(str, layers))})" if layers
               else "a random tiny model")
    return (
        f"Setting: teacher SmolLM2-135M-Instruct; student {student}; training prompts from the built-in "
        f"synthetic math generator. Every method: the same samples (steps x batch), learning rate {ln['lr']:g} "
        f"with {ln['warmup_steps']} warm-up steps, AdamW, each loss with its method defaults (docs/losses.md). "
        f"Offline methods cycle over one teacher dataset per seed ({base['data']['num_prompts']} answers of at "
        f"most {t['max_new_tokens']} tokens at temperature {t['temperature']:g}), whose generation is charged to "
        f"each of them; online methods' teacher answers have the same length, the student's samples at most "
        f"{smp['max_new_tokens']} tokens; dpkd_token runs on the offline rows. dpkd and seqkd_then_dpkd take "
        "y_t from that teacher dataset (schedule teacher_answers: the teacher only scores y_s online); the "
        "primed DPKD variants generate y_t online from their primed prompts. Held out: synthetic problems of "
        "another generator seed ('synth') and the last questions of the GSM8K training file ('GSM8K'), "
        "neither trained on; greedy answers (held-out engine in the header line); KL teacher-forced on the held-out reference solutions, full "
        "vocabulary, nats/token. 'initial' is the truncated student before any training.")


def summarize(results: list[dict]) -> dict[str, dict]:
    """Per method: each column's (mean, sample std, n) over its seeds, in the grid's order."""
    from kd.metrics import mean_std

    out: dict[str, dict] = {}
    for r in results:
        out.setdefault(r["method"], {"runs": []})["runs"].append(r)
    for stats in out.values():
        for key, _ in COLUMNS:
            vals = [r.get(key) for r in stats["runs"] if r.get(key) is not None]
            stats[key] = (*mean_std(vals), len(vals))
    return out


def _cell(mean, std, n, digits: int) -> str:
    if mean is None:
        return "-"
    text = f"{mean:.{digits}f}"
    return text + (f" ± {std:.{digits}f}" if n > 1 else "")


def write_report(results: list[dict], teacher: dict, args, out: Path) -> None:
    """``out`` (markdown table), ``out`` .png (score against wall time) and .json (every run)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = summarize(results)
    shown = [(k, h) for k, h in COLUMNS if any(r.get(k) is not None for r in results)]
    lines = ["# Method benchmark (benchmarks/quality.py)", "",
             f"Command: `python benchmarks/quality.py {' '.join(sys.argv[1:])}`  ",
             f"Ran {time.strftime('%Y-%m-%d %H:%M')} on {os.cpu_count()} CPU cores; {args.steps} steps x batch "
             f"{8 if not args.tiny else 4} per method; seeds {args.seeds}; held-out answers of at most "
             f"{args.max_new_tokens} tokens ({args.eval_backend} engine), {args.limit} synthetic and "
             f"{args.gsm8k_limit if args.gsm8k else 0} GSM8K problems. Mean ± sample std over seeds.", "",
             setting(base_config(None) if not args.tiny else base_config({"teacher": "t", "student": "s"})), "",
             "| method | seeds | " + " | ".join(h for _, h in shown) + " |",
             "|---|---|" + "---|" * len(shown)]
    digits = {"wall_s": 0, "teacher_tokens": 0}
    lines.append("| teacher (reference) | - | " + " | ".join(
        _cell(teacher.get(k), 0, 1, 3) if k in teacher else "-" for k, _ in shown) + " |")
    for name, stats in table.items():
        lines.append(f"| {name} | {len(stats['runs'])} | " + " | ".join(
            _cell(*stats[k], digits.get(k, 3)) for k, _ in shown) + " |")
    y = "gsm8k_rouge_l" if any(r.get("gsm8k_rouge_l") is not None for r in results) else "synth_rouge_l"
    # the text score beside the teacher distance: at small budgets only the latter separates methods
    panels = [y] + (["kl_teacher_student"] if any(r.get("kl_teacher_student") is not None for r in results) else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 5), squeeze=False)
    for ax, key in zip(axes[0], panels):
        for i, (name, stats) in enumerate(table.items()):  # 10 colours: a new marker for each next 10
            xs = [r["wall_s"] for r in stats["runs"]]
            ax.scatter(xs, [r.get(key) for r in stats["runs"]], label=name, alpha=0.8, marker="o^sD"[i // 10 % 4])
        if teacher.get(key) is not None:
            ax.axhline(teacher[key], color="grey", linestyle="--", label="teacher")
        if key == "kl_teacher_student":
            ax.set_yscale("log")  # the untrained student sits ~5x further than the trained ones
        ax.set_xlabel("wall time per run (s; offline methods include their teacher data)")
        ax.set_ylabel({"kl_teacher_student": "held-out KL(teacher || student), nats/token"}.get(key, key.replace("_", " ")))
    axes[0][-1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out.with_suffix(".png"), dpi=110)
    plt.close(fig)  # rewritten after every run: keep no figure open
    lines += ["", f"![{' and '.join(panels)} against wall time]({out.with_suffix('.png').name})", ""]
    timed = [r for r in results if "run_s" in r]
    if timed:  # where the grid's own time goes (shared datasets, generated once per seed, not included)
        n_seeds = len({r["seed"] for r in timed})
        loop = sum(r.get("loop_s", 0.0) for r in timed) / 60
        run = sum(r["run_s"] for r in timed) / 60
        score = sum(r["score_s"] for r in timed) / 60
        lines += [f"Time of the {len(timed)} runs that recorded it ({n_seeds} seed(s)): {run + score:.1f} min, "
                  f"of which {loop:.1f} min in the training loops, {run - loop:.1f} min preparing, starting and "
                  f"stopping each run's actors, {score:.1f} min scoring.", ""]
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"teacher": teacher, "runs": results}, indent=1))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=8, help="training steps per method (x batch 8 samples)")
    ap.add_argument("--methods", default=None, help="comma-separated subset of the grid")
    ap.add_argument("--quick", action="store_true", help=f"methods {', '.join(QUICK)}; seed 0; 4 steps")
    ap.add_argument("--gsm8k", default=None, help="a GSM8K JSONL file: also score on its last questions")
    ap.add_argument("--gsm8k-limit", type=int, default=64)
    ap.add_argument("--limit", type=int, default=64, help="held-out synthetic problems")
    ap.add_argument("--max-new-tokens", type=int, default=128, help="held-out answers' length")
    ap.add_argument("--work", default="runs/quality", help="runs and caches (re-running resumes)")
    ap.add_argument("--out", default="docs/results.md")
    ap.add_argument("--eval-backend", choices=("vllm", "hf"), default="vllm",
                    help="engine of the held-out greedy answers (vllm: one engine, each student's weights "
                         "loaded into it in place)")
    ap.add_argument("--tiny", action="store_true", help="random tiny models (the benchmark's own test)")
    args = ap.parse_args(argv)

    if args.quick:
        args.seeds, args.steps, args.methods = "0", min(args.steps, 4), args.methods or ",".join(QUICK)
    seeds = [int(s) for s in args.seeds.split(",")]
    grid = methods(args.steps)
    chosen = args.methods.split(",") if args.methods else list(grid)
    unknown = [m for m in chosen if m not in grid]
    if unknown:
        ap.error(f"unknown method(s) {', '.join(unknown)}; the grid: {', '.join(grid)}")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import ray
    from tqdm import tqdm

    from driver.config import load_config
    from driver.prepare import prepare

    tiny = None
    if args.tiny:
        from kd.models import make_tiny_model

        tiny = {"teacher": str(make_tiny_model(work / "tiny-teacher", 4, 0)),
                "student": str(make_tiny_model(work / "tiny-student", 2, 1))}
        args.max_new_tokens, args.limit, args.gsm8k_limit = 8, 4, 4
    base = base_config(tiny)
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    results = []
    try:
        probe_cfg = load_config(_write_yaml(work / "probe.yaml", base))
        probe = prepare(probe_cfg, str(_fresh(work / "probe-run")))
        scorer = Scorer(probe_cfg, probe.tokenizer, probe.teacher_path, args.gsm8k, args.gsm8k_limit, args.limit,
                        args.eval_backend)
        teacher_file = work / "teacher-scores.json"
        if not teacher_file.is_file():
            teacher_file.write_text(json.dumps(scorer.score(probe.teacher_path, args.max_new_tokens, kl=False)))
        teacher = json.loads(teacher_file.read_text())
        jobs = [(m, s) for s in seeds for m in chosen]
        for name, seed in tqdm(jobs, desc="quality", unit="run", dynamic_ncols=True):
            data = {"student_path": probe.student_path}
            if uses(grid[name], "TEACHER"):
                data["TEACHER"], data["teacher_cost"] = teacher_dataset(base, seed, work)
            if uses(grid[name], "REFERENCE"):
                cfg = load_config(_write_yaml(work / f"ref-s{seed}.yaml", {**base, "run": {"seed": seed}}))
                prep = prepare(cfg, str(_fresh(work / f"ref-s{seed}-run")))
                data["REFERENCE"] = reference_dataset(cfg, prep, seed, work)
            results.append(run_one(name, grid[name], base, seed, work, data, scorer, args.max_new_tokens))
            write_report(results, teacher, args, Path(args.out))  # after every run: a cut grid still reports
    finally:
        ray.shutdown()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
