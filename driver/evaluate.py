"""``raykd eval`` and periodic evaluation during training.

Metrics (definitions in ``kd/metrics.py``):

- ``exact_match``: GSM8K-style: the numeric answer extracted from the model's output (``####``,
  ``\\boxed{}``, "the answer is", else the last number; commas, units and currency ignored) equals the
  one extracted from the reference. Averaged over examples whose reference has a number.
- ``rouge_l``: Rouge-L F1 (LCS of lower-cased whitespace tokens) between the output and the full
  reference solution text. Averaged over examples with a reference.
- ``answer_rate``: fraction of outputs from which a number could be extracted at all.
- ``kl_teacher_student`` (with a teacher): ``KL(p_teacher || q_student)`` in nats per token,
  teacher-forced on the held-out reference answers (the chat-formatted prompt, then the reference
  text), from both models' *full* logits (transformers, not the engines' top-k, so it is exact), averaged
  over all reference tokens of all examples.
- ``kl_student_teacher``: the reverse, ``KL(q_student || p_teacher)``, on the same tokens.

Generation: greedy by default; with ``--seeds 0,1,2`` one sampled run per seed (temperature
``--temperature``), and each metric is reported as the mean and sample std over the runs.

``--model`` is a Hugging Face model directory or a run directory (then ``RUN_DIR/final``, and
``RUN_DIR/config.yaml`` supplies what the command line leaves out: eval data and fields, prompt format,
teacher, limit, max_new_tokens, seeds). ``--data synthetic_math`` uses the built-in generator with seed
``10_000 + run.seed``, so the problems differ from the training ones (seed ``run.seed``).
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from kd.errors import UserInputError
from kd.metrics import exact_match, extract_answer, mean_std, rouge_l
from kd.models import hf_kwargs

HELD_OUT_SEED = 10_000  # synthetic_math eval seed = HELD_OUT_SEED + run.seed (training uses run.seed)
METRICS = ("exact_match", "rouge_l", "answer_rate")

# prompts (token-id lists), seed (None: greedy) -> generated token-id lists
GenerateFn = Callable[..., list]


class EvalError(UserInputError):
    pass


@dataclass
class Example:
    id: str
    question: str
    reference: str | None  # the full reference solution text (Rouge-L, KL)
    answer: str | None  # its extracted numeric answer (exact match); None: not numeric


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def load_examples(source: str, prompt_field: str = "question", answer_field: str | None = "answer",
                  limit: int | None = None, seed: int = HELD_OUT_SEED) -> list[Example]:
    """Held-out examples from ``synthetic_math`` (``limit`` problems, default ``eval.limit``, generator
    seed ``seed``) or a JSONL/Parquet file (its first ``limit`` rows, default all)."""
    from driver.config import EvalConfig
    from kd.data import iter_rows, rows_to_records, synthetic_math

    if limit is not None and limit <= 0:
        raise EvalError(f"--limit {limit}: must be a positive integer")
    if source == "synthetic_math":
        rows = list(enumerate(synthetic_math(limit or EvalConfig().limit, seed), 1))
        prompt_field, answer_field, where = "question", "answer", "synthetic_math"
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise EvalError(f"{source}: file does not exist")
        if not path.name.endswith((".jsonl", ".json", ".parquet")):
            raise EvalError(f"{source}: expected 'synthetic_math' or a .jsonl/.parquet file")
        rows, where = [], str(path)
        for item in iter_rows(path):
            rows.append(item)
            if limit is not None and len(rows) >= limit:
                break
    records = rows_to_records(rows, prompt_field, answer_field, where)  # validates; names file:row
    examples = []
    for rec in records:  # the reference: the answer field, or a TRL dataset's assistant turn / completion
        examples.append(Example(rec.prompt_id, rec.question, rec.reference, extract_answer(rec.reference)))
    return examples


def encode_prompts(tokenizer, examples: list[Example], system_prompt: str | None, chat_template: bool,
                   max_prompt_tokens: int | None = None) -> list[list[int]]:
    """Prompts formatted as in training (``driver.prepare.encode_chat``); over-long ones keep their end."""
    from driver.prepare import encode_chat

    prompts = [encode_chat(tokenizer, system_prompt, ex.question, chat_template) for ex in examples]
    if max_prompt_tokens:
        prompts = [p[-max_prompt_tokens:] for p in prompts]
    return prompts


# ---------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------


def score_predictions(examples: list[Example], predictions: list[str], seed: int | None = None):
    """(per-example records, metrics) for one run of predictions, aligned with ``examples``."""
    if len(predictions) != len(examples):
        raise ValueError(f"{len(predictions)} predictions for {len(examples)} examples")
    records = []
    for ex, pred in zip(examples, predictions):
        extracted = extract_answer(pred)
        records.append({
            "id": ex.id, "seed": seed, "question": ex.question, "reference": ex.reference,
            "reference_answer": ex.answer, "prediction": pred, "extracted_answer": extracted,
            "correct": exact_match(pred, ex.reference) if ex.reference is not None else None,
            "rouge_l": rouge_l(pred, ex.reference) if ex.reference is not None else None,
        })

    def mean(key, values=None):
        vals = [float(v) for v in (values if values is not None else (r[key] for r in records)) if v is not None]
        return sum(vals) / len(vals) if vals else None

    metrics = {
        "exact_match": mean("correct"),
        "rouge_l": mean("rouge_l"),
        "answer_rate": mean(None, [r["extracted_answer"] is not None for r in records]),
    }
    return records, metrics


def _generate_all(generate_fn: GenerateFn, prompts: list[list[int]], seed: int | None, batch_size: int,
                  bar) -> list[list[int]]:
    out = []
    for b, start in enumerate(range(0, len(prompts), batch_size)):
        chunk = prompts[start:start + batch_size]
        # a distinct, reproducible seed per chunk: identical prompts in two chunks are sampled apart
        out.extend(generate_fn(chunk, None if seed is None else seed * 1_000_003 + b))
        if bar is not None:
            bar.update(len(chunk))
    return out


def evaluate(generate_fn: GenerateFn, tokenizer, examples: list[Example], prompts: list[list[int]],
             seeds: list[int] | None = None, batch_size: int = 16, max_new_tokens: int | None = None,
             progress: bool = False) -> dict:
    """Generate for every prompt (greedy, or once per seed), decode, score.

    Returns ``{"metrics": {m: mean, m + "_std": std, ...}, "runs": [{"seed", m...}], "examples": [...]}``
    where ``m`` ranges over ``METRICS`` and the std is over runs (0.0 for one run)."""
    runs_seeds = list(seeds) if seeds else [None]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(prompts) * len(runs_seeds), desc="eval", unit="example", dynamic_ncols=True)
    runs, records = [], []
    try:
        for seed in runs_seeds:
            ids = _generate_all(generate_fn, prompts, seed, batch_size, bar)
            if max_new_tokens:
                ids = [list(x)[:max_new_tokens] for x in ids]
            texts = [tokenizer.decode(x, skip_special_tokens=True).strip() for x in ids]
            recs, m = score_predictions(examples, texts, seed)
            records.extend(recs)
            runs.append({"seed": seed, **m})
    finally:
        if bar is not None:
            bar.close()
    metrics = {}
    for key in METRICS:
        metrics[key], metrics[f"{key}_std"] = mean_std(r[key] for r in runs)
    return {"metrics": metrics, "runs": runs, "examples": records}


# ---------------------------------------------------------------------------------------------
# Teacher <-> student KL on held-out text
# ---------------------------------------------------------------------------------------------


def teacher_student_kl(teacher_path: str, student_path: str, prompts: list[list[int]],
                       continuations: list[list[int]], progress: bool = False) -> dict:
    """Token means of ``KL(p_teacher || q_student)`` and ``KL(q_student || p_teacher)`` over
    ``continuations`` teacher-forced after ``prompts``, from both models' full logits:
    ``{"kl_teacher_student": nats/token, "kl_student_teacher": nats/token, "kl_tokens": n}``."""
    return TeacherReference(teacher_path, prompts, continuations, progress).kl(student_path, progress)


class TeacherReference:
    """The teacher's full-vocabulary log-probs on fixed (prompt, continuation) pairs, computed once, so
    that scoring many students against the same teacher costs one student forward each (the method
    benchmark scores dozens). Holds ``tokens x vocab`` fp32 values (about 1 GB for 5k tokens of a
    49k vocabulary)."""

    def __init__(self, teacher_path: str, prompts: list[list[int]], continuations: list[list[int]],
                 progress: bool = False):
        import torch

        self.pairs = [(p, c) for p, c in zip(prompts, continuations) if c]
        teacher = _load_eval_model(teacher_path)
        with torch.no_grad():
            self.logps = [torch.log_softmax(_continuation_logits(teacher, p, c).float(), -1)
                          for p, c in _maybe_progress(self.pairs, progress, "teacher")]
        del teacher

    def kl(self, student_path: str, progress: bool = False) -> dict:
        import torch

        from kd.metrics import kl_both_ways

        student = _load_eval_model(student_path)
        total, reverse, count = 0.0, 0.0, 0
        with torch.no_grad():
            for t, (prompt, cont) in zip(self.logps, _maybe_progress(self.pairs, progress, "kl")):
                s = _continuation_logits(student, prompt, cont)
                vocab = min(t.shape[-1], s.shape[-1])  # embeddings may be padded past the tokenizer
                logp = t if t.shape[-1] == vocab else torch.log_softmax(t[:, :vocab], -1)  # t: log-probs
                forward, rev = kl_both_ways(logp, torch.log_softmax(s[:, :vocab].float(), -1))
                total += float(forward.sum())
                reverse += float(rev.sum())  # the student as reference
                count += len(cont)
        return {"kl_teacher_student": total / count if count else None,
                "kl_student_teacher": reverse / count if count else None, "kl_tokens": count}


def _load_eval_model(path: str):
    import torch
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **hf_kwargs()).to(device).eval()


def _continuation_logits(model, prompt: list[int], cont: list[int]):
    """Logits at positions len(prompt)-1 ... that predict ``cont``'s tokens, on the CPU (the output
    layer runs on those positions only: ``logits_to_keep``)."""
    import torch

    ids = torch.tensor([prompt + cont], device=model.device)
    return model(input_ids=ids, logits_to_keep=len(cont) + 1).logits[0, :-1].cpu()


def _maybe_progress(items, progress: bool, desc: str):
    if not progress:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="example", dynamic_ncols=True)


# ---------------------------------------------------------------------------------------------
# `raykd eval`
# ---------------------------------------------------------------------------------------------


def resolve_model_arg(arg: str) -> tuple[Path, Path | None]:
    """(HF model dir, run dir or None) for ``--model``: a model directory, or a run directory; its
    weights present and complete (``kd.models.check_weights``)."""
    from kd.models import check_weights

    model, run = _model_and_run(arg)
    return check_weights(model), run


def _model_and_run(arg: str) -> tuple[Path, Path | None]:
    p = Path(arg).expanduser()
    if not p.exists():
        raise EvalError(f"--model {arg}: does not exist")
    if (p / "config.json").is_file():
        run = p.parent if p.name == "final" and (p.parent / "config.yaml").is_file() else None
        return p, run
    if (p / "final" / "config.json").is_file():
        return p / "final", p
    if (p / "config.yaml").is_file():
        raise EvalError(f"--model {arg}: run directory has no final/ model (did the run finish?)")
    raise EvalError(f"--model {arg}: neither a Hugging Face model directory (no config.json) nor a "
                    "run directory (no final/)")


def _run_config(run_dir: Path | None) -> dict:
    if run_dir is None:
        return {}
    import yaml

    path = run_dir / "config.yaml"
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise EvalError(f"{path}: unreadable run config: {str(e).splitlines()[0]}") from None
    return data if isinstance(data, dict) else {}


def _pick(cli, cfg: dict, section: str, key: str, default):
    """The command line's value, else the run config's, else the default."""
    if cli is not None:
        return cli
    value = (cfg.get(section) or {}).get(key)
    return default if value is None else value


def _parse_seeds(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise EvalError(f"--seeds {text!r}: expected comma-separated integers, e.g. 0,1,2") from None


def run_eval(args) -> dict:
    """The whole ``raykd eval``: resolve inputs, generate, score, optional KL; returns the result."""
    from transformers import AutoTokenizer

    from actors.engines import SamplingParams, make_engine
    from driver.config import DataConfig, EvalConfig, SamplerConfig

    model, run_dir = resolve_model_arg(args.model)
    rc = _run_config(run_dir)
    from_eval = args.data is None  # data from the run's eval section
    source = _pick(args.data, rc, "eval", "source", None)
    if source is None:
        raise EvalError("--data is required (a .jsonl/.parquet file or synthetic_math) unless --model "
                        "is a run directory")
    section, d, e = ("eval" if from_eval else "data"), DataConfig(), EvalConfig()
    prompt_field = _pick(args.prompt_field, rc, section, "prompt_field", d.prompt_field)
    answer_field = _pick(args.answer_field, rc, section, "answer_field", d.answer_field)
    limit = _pick(args.limit, rc if from_eval else {}, "eval", "limit", None)
    seed = HELD_OUT_SEED + int((rc.get("run") or {}).get("seed") or 0)
    examples = load_examples(source, prompt_field, answer_field, limit, seed)
    seeds = _parse_seeds(args.seeds)
    seeds = seeds if seeds is not None else list((rc.get("eval") or {}).get("seeds") or [])
    max_new = int(_pick(args.max_new_tokens, rc, "eval", "max_new_tokens", e.max_new_tokens))
    temperature = float(_pick(args.temperature, rc, "sampler", "temperature", SamplerConfig().temperature))
    if max_new <= 0:
        raise EvalError(f"--max-new-tokens {max_new}: must be a positive integer")
    if args.batch_size <= 0:
        raise EvalError(f"--batch-size {args.batch_size}: must be a positive integer")

    tok = AutoTokenizer.from_pretrained(model, **hf_kwargs())
    data_cfg = rc.get("data") or {}
    prompts = encode_prompts(tok, examples, data_cfg.get("system_prompt", d.system_prompt),
                             data_cfg.get("chat_template", d.chat_template),
                             data_cfg.get("max_prompt_tokens", d.max_prompt_tokens))
    engine = make_engine(args.backend, str(model), max_model_len=max(map(len, prompts)) + max_new + 8,
                         max_logprobs=1, seed=0)

    def generate_fn(batch, seed=None):
        params = SamplingParams(max_new_tokens=max_new, temperature=0.0 if seed is None else temperature,
                                seed=seed)
        return [g.token_ids for g in engine.generate(batch, params)]

    t0 = time.perf_counter()
    result = evaluate(generate_fn, tok, examples, prompts, seeds, args.batch_size, max_new,
                      progress=not args.no_progress)
    teacher = _teacher(args, rc)
    if teacher is not None:
        from driver.prepare import check_same_tokenizer

        check_same_tokenizer(Path(teacher), model)
        conts = [tok.encode(ex.reference, add_special_tokens=False) if ex.reference else [] for ex in examples]
        result["metrics"].update(teacher_student_kl(teacher, str(model), prompts, conts,
                                                    progress=not args.no_progress))
    result = {"model": str(model), "run_dir": None if run_dir is None else str(run_dir), "data": source,
              "num_examples": len(examples), "mode": "sampled" if seeds else "greedy", "seeds": seeds,
              "temperature": temperature if seeds else 0.0, "max_new_tokens": max_new,
              "backend": args.backend, "teacher": teacher, "eval_s": time.perf_counter() - t0, **result}
    return result


def _teacher(args, rc: dict) -> str | None:
    if args.no_teacher:
        return None
    spec = args.teacher or (rc.get("models") or {}).get("teacher")
    if not spec:
        return None
    from kd.models import resolve_model

    cache = (rc.get("models") or {}).get("cache_dir")
    return str(resolve_model(spec, Path(cache).expanduser() if cache else None))


def format_table(result: dict) -> str:
    m = result["metrics"]
    runs = result.get("runs") or []
    head = (f"{result['num_examples']} examples, "
            + ("greedy" if result.get("mode") == "greedy"
               else f"{len(runs)} sampled runs (seeds {','.join(map(str, result['seeds']))}, "
                    f"T={result['temperature']:g})"))
    lines = [head, f"{'metric':<20}{'mean':>10}{'std':>10}"]

    def f(v):
        return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.4f}"

    for key in METRICS:
        lines.append(f"{key:<20}{f(m.get(key)):>10}{f(m.get(key + '_std')):>10}")
    for key in ("kl_teacher_student", "kl_student_teacher"):
        if key in m:
            lines.append(f"{key:<20}{f(m[key]):>10}{'-':>10}"
                         f"   (nats/token over {m.get('kl_tokens', 0)} reference tokens)")
    return "\n".join(lines)


def _eval_cmd(args) -> int:
    result = run_eval(args)
    print(format_table(result))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
        print(f"raykd: wrote {out}", file=sys.stderr)
    return 0


def register(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a model (or a run's final student) on held-out prompts")
    p.add_argument("--model", required=True, metavar="PATH_OR_RUN_DIR")
    p.add_argument("--data", default=None, metavar="FILE",
                   help="a .jsonl/.parquet file or synthetic_math (default: the run's eval.source)")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N examples")
    p.add_argument("--backend", choices=("hf", "vllm", "auto"), default="hf")
    p.add_argument("--seeds", default=None, help="sample once per seed, e.g. 0,1,2 (default: greedy)")
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature with --seeds")
    p.add_argument("--teacher", default=None, help="also report KL(teacher||student) on the references")
    p.add_argument("--no-teacher", action="store_true", help="ignore the run config's teacher")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--prompt-field", default=None)
    p.add_argument("--answer-field", default=None)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", default=None, metavar="FILE.json", help="write metrics and per-example results")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_eval_cmd)


# ---------------------------------------------------------------------------------------------
# Periodic evaluation during training
# ---------------------------------------------------------------------------------------------


class PeriodicEval:
    """``eval.every_steps`` evaluation inside the training loop, on ``eval.source`` (held out).

    Built once from the run config and the tokenizer (data errors surface here, before training);
    ``run(generate_fn)`` takes ``generate_fn(prompts, seed=None) -> token-id lists`` (greedy when
    ``seed`` is None; called with a seed only when ``eval.seeds`` is set) and returns flat metrics
    for metrics.jsonl: ``eval_exact_match``, ``eval_rouge_l``, ``eval_answer_rate``, ``eval_s``
    (and ``*_std`` over seeds when there are several)."""

    def __init__(self, cfg, tokenizer):
        e = cfg.eval
        self.every = e.every_steps
        self.seeds = list(e.seeds)
        self.max_new_tokens = e.max_new_tokens
        self.tokenizer = tokenizer
        self.examples = load_examples(e.source, e.prompt_field, e.answer_field, e.limit,
                                      HELD_OUT_SEED + cfg.run.seed)
        self.prompts = encode_prompts(tokenizer, self.examples, cfg.data.system_prompt, cfg.data.chat_template,
                                      cfg.data.max_prompt_tokens)

    def due(self, step: int) -> bool:
        return self.every > 0 and step > 0 and step % self.every == 0

    def run(self, generate_fn: GenerateFn) -> dict:
        t = time.perf_counter()

        def call(prompts, seed):  # greedy callers need not accept a seed
            return generate_fn(prompts) if seed is None else generate_fn(prompts, seed)

        result = evaluate(call, self.tokenizer, self.examples, self.prompts, self.seeds,
                          batch_size=len(self.prompts), max_new_tokens=self.max_new_tokens)
        m = result["metrics"]
        row = {f"eval_{k}": m[k] for k in METRICS}
        if len(self.seeds) > 1:
            row.update({f"eval_{k}_std": m[f"{k}_std"] for k in METRICS})
        row["eval_s"] = time.perf_counter() - t
        return row
