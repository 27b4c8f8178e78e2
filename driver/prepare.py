"""Everything a run needs before any actor starts: run directory, model paths, tokenised prompts.

All of it fails fast with one clear line (``SetupError`` and the config/data/model errors), so a typo
never costs a cluster start.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from driver.config import Config, dump_config
from kd.data import load_prompts
from kd.errors import UserInputError
from kd.models import check_weights, hf_kwargs, resolve_model, truncate_layers, truncated_student_dir
from kd.priming import prime
from kd.vocab import (check_embedding_covers_tokenizer, check_vocab_sizes, model_vocab_size,
                      tokenizer_fingerprint)


class SetupError(UserInputError):
    pass


@dataclass
class Prepared:
    run_dir: Path
    teacher_path: str
    student_path: str
    requests: list[dict]
    skipped_overlong: int
    tokenizer: object
    teacher_paths: dict | None = None  # teacher pool name -> model dir (None: {'default': teacher_path})

    def pools(self) -> dict:
        return self.teacher_paths or {"default": self.teacher_path}


def make_run_dir(cfg: Config, run_dir: str | None, resume: bool = False, overwrite: bool = False) -> Path:
    """The run's directory, with the resolved config (a resume keeps the saved one: see driver.runs)."""
    from driver.runs import claim_run_dir, clear_run_dir

    path = Path(run_dir) if run_dir is not None else claim_run_dir(cfg, None)
    if overwrite:
        clear_run_dir(path)
    path.mkdir(parents=True, exist_ok=True)
    if not resume:
        dump_config(cfg, path / "config.yaml")
    return path


def prepare_teachers(cfg: Config, student: str) -> dict[str, str]:
    """Every teacher pool's model dir (``teachers:``), each checked against the student's tokenizer."""
    cache = Path(cfg.models.cache_dir).expanduser() if cfg.models.cache_dir else None
    out = {}
    for t in cfg.teacher_pools():
        path = resolve_model(t.model, cache)
        check_same_tokenizer(path, Path(student))
        check_vocab_sizes(f"teachers.{t.name}.model ({path})", model_vocab_size(path),
                          f"models.student ({student})", model_vocab_size(student), cfg)
        out[t.name] = str(path)
    return out


def prepare_models(cfg: Config) -> tuple[str, str]:
    cache = Path(cfg.models.cache_dir).expanduser() if cfg.models.cache_dir else None
    teacher = resolve_model(cfg.models.teacher, cache)
    if cfg.models.student is not None:
        student = resolve_model(cfg.models.student, cache)
    else:
        keep = cfg.models.student_keep_layers
        student = check_weights(truncate_layers(teacher, keep, truncated_student_dir(teacher, keep, cache)))
    check_same_tokenizer(teacher, student)
    check_vocab_sizes(f"models.teacher ({teacher})", model_vocab_size(teacher),
                      f"models.student ({student})", model_vocab_size(student), cfg)
    return str(teacher), str(student)


def check_same_tokenizer(teacher: Path, student: Path):
    """DPKD scores the student's text under the teacher and vice versa: one vocabulary for both, and
    each model's embedding covers it. Returns the student's tokenizer."""
    from transformers import AutoTokenizer

    a, b = AutoTokenizer.from_pretrained(teacher, **hf_kwargs()), AutoTokenizer.from_pretrained(student, **hf_kwargs())
    probe = "Ava has 12 apples; she buys 7 more. #### 19"
    if (len(a) != len(b) or a.encode(probe) != b.encode(probe)
            or tokenizer_fingerprint(a) != tokenizer_fingerprint(b)):
        raise SetupError(f"models.teacher ({teacher}) and models.student ({student}) use different "
                         f"tokenizers (vocab {len(a)} vs {len(b)}); raykd needs a shared vocabulary")
    check_embedding_covers_tokenizer(teacher, a)
    check_embedding_covers_tokenizer(student, b)
    return b


def check_context(cfg: Config, *model_dirs: str) -> None:
    """Prompt plus response must fit every model's context window."""
    from transformers import AutoConfig

    longest = cfg.data.max_prompt_tokens + max(cfg.teacher.max_new_tokens, cfg.sampler.max_new_tokens)
    for path in model_dirs:
        ctx = getattr(AutoConfig.from_pretrained(path, **hf_kwargs()), "max_position_embeddings", None)
        if ctx is not None and longest > ctx:
            raise SetupError(f"data.max_prompt_tokens + max_new_tokens = {longest} > {path}'s context of "
                             f"{ctx} tokens; lower data.max_prompt_tokens or teacher/sampler.max_new_tokens")


def encode_chat(tok, system: str | None, user: str, use_template: bool) -> list[int]:
    if not use_template:
        return tok.encode(user if system is None else f"{system}\n\n{user}")
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    return list(tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False))


def build_requests(cfg: Config, tok, records) -> tuple[list[dict], int]:
    """Tokenised student and (primed) teacher prompts; over-long prompts per ``data.on_overlong``.
    Each request names the teacher pool that answers it (``driver.router``)."""
    from driver.router import teacher_for

    d, p = cfg.data, cfg.priming
    requests, skipped = [], 0
    for i, rec in enumerate(records):
        student = encode_chat(tok, d.system_prompt, rec.question, d.chat_template)
        teacher_q = prime(rec.question, p.strategy, rec.answer, p.template, p.placement, p.wording)
        teacher = encode_chat(tok, d.system_prompt, teacher_q, d.chat_template)
        if max(len(student), len(teacher)) > d.max_prompt_tokens:
            if d.on_overlong == "error":
                raise SetupError(f"{d.source}: prompt {rec.prompt_id} has {max(len(student), len(teacher))} "
                                 f"tokens > data.max_prompt_tokens={d.max_prompt_tokens}")
            if d.on_overlong == "skip":
                skipped += 1
                continue
            # keep the end: the chat template's assistant header must survive
            student, teacher = student[-d.max_prompt_tokens:], teacher[-d.max_prompt_tokens:]
        requests.append({"prompt_id": rec.prompt_id, "prompt_ids": student, "teacher_prompt_ids": teacher,
                         "priming": p.strategy, "reference_answer": rec.answer,
                         "teacher": teacher_for(cfg, rec.prompt_id, rec.route)})
    if not requests:
        raise SetupError(f"{d.source}: every prompt is longer than data.max_prompt_tokens="
                         f"{d.max_prompt_tokens} ({skipped} skipped)")
    return requests, skipped


def report_skipped(cfg: Config, skipped: int, total: int) -> None:
    """Said on screen at start: a silently smaller dataset looks like a bug later."""
    if skipped:
        print(f"raykd: skipped {skipped} of {total} prompts longer than data.max_prompt_tokens="
              f"{cfg.data.max_prompt_tokens} (data.on_overlong={cfg.data.on_overlong})", file=sys.stderr)


def check_offline_data(cfg: Config, tok, student: str) -> None:
    """Every offline phase's dataset was written by a teacher whose vocabulary fits this student."""
    from driver.offline import check_dataset_teacher

    for i, ph in enumerate(cfg.phases()):
        if ph.kind == "offline" and ph.data is not None:  # none: the run generates it, with its own teacher
            check_dataset_teacher(ph.data, f"schedule[{i}]", ph.loss.type, tok, model_vocab_size(student))


def prepare(cfg: Config, run_dir: str | None = None, resume: bool = False, overwrite: bool = False) -> Prepared:
    """``resume``: the directory holds the run being continued (its config.yaml is left alone);
    ``overwrite``: clear a run already there (``--overwrite``) once every check has passed."""
    import os

    from kd.models import TRUST_REMOTE_CODE_ENV

    os.environ[TRUST_REMOTE_CODE_ENV] = "1" if cfg.models.trust_remote_code else "0"
    from driver.router import route_spec

    records = load_prompts(cfg.data.source, cfg.data.prompt_field, cfg.data.answer_field,
                           cfg.data.num_prompts, cfg.run.seed, route_spec(cfg))
    teacher, student = prepare_models(cfg)
    teachers = prepare_teachers(cfg, student) if cfg.teachers else None
    check_context(cfg, teacher, student, *(teachers or {}).values())
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(student, **hf_kwargs())
    check_offline_data(cfg, tok, student)
    requests, skipped = build_requests(cfg, tok, records)
    report_skipped(cfg, skipped, len(records))
    path = make_run_dir(cfg, run_dir, resume, overwrite)
    with open(path / "data_summary.json", "w") as f:
        json.dump({"source": cfg.data.source, "rows": len(records), "prompts": len(requests),
                   "skipped_overlong": skipped}, f, indent=1)
    return Prepared(path, teacher, student, requests, skipped, tok, teachers)
