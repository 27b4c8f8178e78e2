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
from kd.vocab import (CROSS_TOKENIZER_LOSSES, check_embedding_covers_tokenizer, check_vocab_sizes,
                      cross_tokenizer_refusals, model_vocab_size, tokenizer_fingerprint)


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
    text_pools: frozenset = frozenset()  # the pools whose tokenizer is not the student's (the text path)

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


def prepare_teachers(cfg: Config, student: str, text_pools: set[str]) -> dict[str, str]:
    """Every teacher pool's model dir (``teachers:``), each checked against the student's tokenizer;
    the pools with another tokenizer are added to ``text_pools`` (the text path)."""
    cache = Path(cfg.models.cache_dir).expanduser() if cfg.models.cache_dir else None
    out = {}
    for t in cfg.teacher_pools():
        path = resolve_model(t.model, cache)
        if check_tokenizers(cfg, f"teachers.{t.name}.model", path, Path(student)):
            text_pools.add(t.name)
        out[t.name] = str(path)
    return out


def prepare_models(cfg: Config, text_pools: set[str] | None = None) -> tuple[str, str]:
    """The teacher's and the student's model dirs. With ``text_pools`` (a set) a teacher with another
    tokenizer is allowed: its pool ('default') is added to the set; without, it is refused. With
    ``teachers:`` each pool is checked by ``prepare_teachers`` instead."""
    cache = Path(cfg.models.cache_dir).expanduser() if cfg.models.cache_dir else None
    teacher = resolve_model(cfg.models.teacher, cache)
    if cfg.models.student is not None:
        student = resolve_model(cfg.models.student, cache)
    else:
        keep, vocab = cfg.models.student_keep_layers, cfg.models.student_vocab_size
        student = check_weights(truncate_layers(teacher, keep, truncated_student_dir(teacher, keep, cache, vocab),
                                                vocab))
    if text_pools is None:
        check_same_tokenizer(teacher, student)
        check_vocab_sizes(f"models.teacher ({teacher})", model_vocab_size(teacher),
                          f"models.student ({student})", model_vocab_size(student), cfg)
    elif not cfg.teachers and check_tokenizers(cfg, "models.teacher", teacher, student):
        text_pools.add("default")
    return str(teacher), str(student)


def _tokenizers(*model_dirs):
    from transformers import AutoTokenizer

    return [AutoTokenizer.from_pretrained(m, **hf_kwargs()) for m in model_dirs]


def same_tokenizer(a, b) -> bool:
    """One vocabulary (the fingerprint: token -> id map and special tokens), not merely one size."""
    probe = "Ava has 12 apples; she buys 7 more. #### 19"
    return (len(a) == len(b) and a.encode(probe) == b.encode(probe)
            and tokenizer_fingerprint(a) == tokenizer_fingerprint(b))


def check_same_tokenizer(teacher: Path, student: Path):
    """For what compares the two models token by token (``raykd eval --teacher``'s KL): one vocabulary
    for both, and each model's embedding covers it. Returns the student's tokenizer."""
    a, b = _tokenizers(teacher, student)
    if not same_tokenizer(a, b):
        raise SetupError(f"models.teacher ({teacher}) and models.student ({student}) use different "
                         f"tokenizers (vocab {len(a)} vs {len(b)}); raykd needs a shared vocabulary")
    check_embedding_covers_tokenizer(teacher, a)
    check_embedding_covers_tokenizer(student, b)
    return b


def check_tokenizers(cfg: Config, what: str, teacher: Path, student: Path) -> bool:
    """Same tokenizer: the fast path (False), with the vocab-size checks. Another tokenizer: the text
    path (True; docs/teachers.md), once every phase's loss can work on it; said in the run's log."""
    a, b = _tokenizers(teacher, student)
    check_embedding_covers_tokenizer(teacher, a)
    check_embedding_covers_tokenizer(student, b)
    if same_tokenizer(a, b):
        check_vocab_sizes(f"{what} ({teacher})", model_vocab_size(teacher),
                          f"models.student ({student})", model_vocab_size(student), cfg)
        return False
    works = " or ".join(CROSS_TOKENIZER_LOSSES)
    bad = cross_tokenizer_refusals(cfg)
    if bad:
        raise SetupError(f"{what} ({teacher}, vocab {len(a)}) and models.student ({student}, vocab {len(b)}) "
                         f"use different tokenizers, but {', '.join(bad)} needs the teacher's log-probs token by "
                         f"token in the student's vocabulary; across tokenizers use loss.type {works} "
                         "(docs/teachers.md)")
    if cfg.eval.teacher:
        raise SetupError(f"eval.teacher: {what} ({teacher}) has another tokenizer than models.student, and the "
                         f"held-out prompts are in the student's tokens; score the teacher on its own with "
                         f"raykd eval --model {teacher}")
    print(f"raykd: text path: {what} (tokenizer vocab {len(a)}) and models.student (tokenizer vocab {len(b)}) "
          f"use different tokenizers; responses cross between them as text; losses that work: "
          f"{', '.join(CROSS_TOKENIZER_LOSSES)}",
          file=sys.stderr)
    return True


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


def build_requests(cfg: Config, tok, records, teacher_toks: dict | None = None) -> tuple[list[dict], int]:
    """Tokenised student and (primed) teacher prompts; over-long prompts per ``data.on_overlong``.
    Each request names the teacher pool that answers it (``driver.router``). ``teacher_toks``: pool
    name -> tokenizer for the pools on the text path: their teacher prompts are the prompt text through
    the teacher's own tokenizer and chat template (and ``teacher_plain_prompt_ids`` the unprimed one)."""
    from driver.router import teacher_for

    d, p = cfg.data, cfg.priming
    teacher_toks = teacher_toks or {}
    requests, skipped = [], 0
    for i, rec in enumerate(records):
        name = teacher_for(cfg, rec.prompt_id, rec.route)
        t_tok = teacher_toks.get(name, tok)
        student = encode_chat(tok, d.system_prompt, rec.question, d.chat_template)
        teacher_q = prime(rec.question, p.strategy, rec.answer, p.template, p.placement, p.wording)
        teacher = encode_chat(t_tok, d.system_prompt, teacher_q, d.chat_template)
        prompts = {"prompt_ids": student, "teacher_prompt_ids": teacher}
        if name in teacher_toks:
            prompts["teacher_plain_prompt_ids"] = encode_chat(t_tok, d.system_prompt, rec.question, d.chat_template)
        longest = max(map(len, prompts.values()))
        if longest > d.max_prompt_tokens:
            if d.on_overlong == "error":
                raise SetupError(f"{d.source}: prompt {rec.prompt_id} has {longest} "
                                 f"tokens > data.max_prompt_tokens={d.max_prompt_tokens}")
            if d.on_overlong == "skip":
                skipped += 1
                continue
            # keep the end: the chat template's assistant header must survive
            prompts = {k: v[-d.max_prompt_tokens:] for k, v in prompts.items()}
        requests.append({"prompt_id": rec.prompt_id, **prompts, "priming": p.strategy,
                         "reference_answer": rec.answer, "teacher": name})
    if not requests:
        raise SetupError(f"{d.source}: every prompt is longer than data.max_prompt_tokens="
                         f"{d.max_prompt_tokens} ({skipped} skipped)")
    return requests, skipped


def report_skipped(cfg: Config, skipped: int, total: int) -> None:
    """Said on screen at start: a silently smaller dataset looks like a bug later."""
    if skipped:
        print(f"raykd: skipped {skipped} of {total} prompts longer than data.max_prompt_tokens="
              f"{cfg.data.max_prompt_tokens} (data.on_overlong={cfg.data.on_overlong})", file=sys.stderr)


def check_offline_data(cfg: Config, tok, student: str, teacher: str, text_pools: set[str]) -> None:
    """Every offline phase's dataset was written by a teacher whose vocabulary fits this student, and
    every dataset an online phase takes its teacher's answers from by this run's teacher."""
    from driver.offline import answers_source, check_dataset_teacher, check_teacher_answers

    phases = cfg.phases()
    for i, ph in enumerate(phases):
        if ph.kind == "offline" and ph.data is not None:  # none: the run generates it, with its own teacher
            check_dataset_teacher(ph.data, f"schedule[{i}]", ph.loss.type, tok, model_vocab_size(student))
        if ph.teacher_answers is None:
            continue
        if text_pools:
            raise SetupError(f"schedule[{i}].teacher_answers={ph.teacher_answers}: the teacher has another "
                             "tokenizer than the student (the text path); its answers are not reused there")
        source = answers_source(phases, i)
        if source is not None:  # none: the run's own teacher-data, written with this very config
            check_teacher_answers(cfg, source, f"schedule[{i}]", ph.loss, tok, model_vocab_size(student), teacher)


def prepare(cfg: Config, run_dir: str | None = None, resume: bool = False, overwrite: bool = False) -> Prepared:
    """``resume``: the directory holds the run being continued (its config.yaml is left alone);
    ``overwrite``: clear a run already there (``--overwrite``) once every check has passed."""
    import os

    from kd.models import TRUST_REMOTE_CODE_ENV

    os.environ[TRUST_REMOTE_CODE_ENV] = "1" if cfg.models.trust_remote_code else "0"
    from driver.router import route_spec

    records = load_prompts(cfg.data.source, cfg.data.prompt_field, cfg.data.answer_field,
                           cfg.data.num_prompts, cfg.run.seed, route_spec(cfg))
    text_pools: set[str] = set()
    teacher, student = prepare_models(cfg, text_pools)
    teachers = prepare_teachers(cfg, student, text_pools) if cfg.teachers else None
    check_context(cfg, teacher, student, *(teachers or {}).values())
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(student, **hf_kwargs())
    check_offline_data(cfg, tok, student, teacher, text_pools)
    paths, text = teachers or {"default": teacher}, sorted(text_pools)
    teacher_toks = dict(zip(text, _tokenizers(*(paths[n] for n in text))))
    requests, skipped = build_requests(cfg, tok, records, teacher_toks)
    report_skipped(cfg, skipped, len(records))
    path = make_run_dir(cfg, run_dir, resume, overwrite)
    with open(path / "data_summary.json", "w") as f:
        json.dump({"source": cfg.data.source, "rows": len(records), "prompts": len(requests),
                   "skipped_overlong": skipped, "text_path": sorted(text_pools)}, f, indent=1)
    return Prepared(path, teacher, student, requests, skipped, tok, teachers, frozenset(text_pools))
