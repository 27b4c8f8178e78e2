"""Offline teacher datasets: ``raykd generate`` writes them, the offline phase of ``raykd train`` reads them.

A dataset is a directory of Parquet shards in the replay-buffer schema (teacher response, its
per-token log-probs and top-k, prompt, priming strategy; no student response, ``policy_version`` -1)
plus ``manifest.json``. Each shard is written under a temporary name and renamed when complete, so
a killed run never leaves a half shard under its final name, and a re-run skips finished shards.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from kd.data import BUFFER_SCHEMA, with_optional_columns
from kd.errors import UserInputError
from kd.models import hf_kwargs

MANIFEST = "manifest.json"


class DatasetError(UserInputError):
    pass


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.parquet"


def _identity(cfg, num_requests: int, shard_size: int) -> dict:
    """What must match for a re-run to continue an existing dataset."""
    t = cfg.teacher
    return {
        "teacher": cfg.models.teacher, "data": cfg.data.source, "num_prompts": num_requests,
        "priming": cfg.priming.strategy, "priming_template": cfg.priming.template,
        "priming_wording": cfg.priming.wording, "priming_placement": cfg.priming.placement,
        "score_with": cfg.priming.score_with, "max_new_tokens": t.max_new_tokens,
        "temperature": t.temperature, "top_p": t.top_p, "top_k_logprobs": t.top_k_logprobs,
        "shard_size": shard_size, "seed": cfg.run.seed,
    }


def teacher_stamp(spec: str, path: str, tok, text_path: bool = False) -> dict:
    """Who wrote a dataset, as far as a student cares: the tokenizer of its token ids (``tok``: the
    teacher's, or on the text path the student's, into which the teacher's text was re-tokenized) and
    the teacher's embedding size."""
    from kd.vocab import model_vocab_size, tokenizer_fingerprint

    return {"spec": spec, "path": path, "tokenizer_fingerprint": tokenizer_fingerprint(tok),
            "vocab_size": model_vocab_size(path), **({"text_path": True} if text_path else {})}


def _stamp_keys(stamp: dict) -> dict:
    return {"tokenizer_fingerprint": stamp.get("tokenizer_fingerprint"), "vocab_size": stamp.get("vocab_size")}


def _check_manifest(out: Path, identity: dict, stamp: dict) -> None:
    path = out / MANIFEST
    if not path.exists():
        return
    data = json.loads(path.read_text())
    old = data.get("identity", {})
    if data.get("teacher_model"):  # the same spec may now be another model: its shards would mix
        old, identity = {**old, **_stamp_keys(data["teacher_model"])}, {**identity, **_stamp_keys(stamp)}
    diff = sorted(k for k in identity.keys() | old.keys() if identity.get(k) != old.get(k))
    if diff:
        raise DatasetError(f"{path}: the existing dataset was generated with other settings "
                           f"({', '.join(f'{k}: {old.get(k)!r} -> {identity.get(k)!r}' for k in diff)}); "
                           "use a new --out directory")


def generate_dataset(cfg, out_dir: str | Path, shard_size: int = 64, progress: bool = True) -> dict:
    """Run the TeacherPool over the configured prompts into Parquet shards under ``out_dir``."""
    import ray
    from transformers import AutoTokenizer

    from actors.engines import resolve_backend
    from actors.teacher_pool import TeacherPool
    from driver.cluster import actor_options, check_resources, engine_opts, start_ray
    from driver.prepare import build_requests, report_skipped
    from kd.vocab import check_embedding_covers_tokenizer
    from kd.data import load_prompts
    from kd.models import resolve_model

    if shard_size <= 0:
        raise DatasetError(f"--shard-size={shard_size}: must be a positive integer")
    records = load_prompts(cfg.data.source, cfg.data.prompt_field, cfg.data.answer_field,
                           cfg.data.num_prompts, cfg.run.seed)
    cache = Path(cfg.models.cache_dir).expanduser() if cfg.models.cache_dir else None
    teacher_path = str(resolve_model(cfg.models.teacher, cache))
    tok = AutoTokenizer.from_pretrained(teacher_path, **hf_kwargs())
    check_embedding_covers_tokenizer(teacher_path, tok)
    student_path, teacher_toks = _text_path_student(cfg, cache, tok)
    if teacher_toks:  # the rows are written in the student's tokens
        tok = AutoTokenizer.from_pretrained(student_path, **hf_kwargs())
    requests, skipped = build_requests(cfg, tok, records, teacher_toks)
    report_skipped(cfg, skipped, len(records))
    stamp = teacher_stamp(cfg.models.teacher, teacher_path, tok, text_path=bool(teacher_toks))
    _check_manifest(Path(out_dir), _identity(cfg, len(requests), shard_size), stamp)  # before Ray starts
    started = start_ray(cfg)
    t = cfg.teacher
    try:
        check_resources(cfg, roles=("teacher",))
        pool = TeacherPool(
            t.num_replicas, actor_options(t.engine),
            model_path=teacher_path, backend=resolve_backend(t.engine.backend),
            engine_opts=engine_opts(t.engine, cfg, t.max_new_tokens),
            sampling={"max_new_tokens": t.max_new_tokens, "temperature": t.temperature, "top_p": t.top_p},
            top_k=t.top_k_logprobs, score_with=cfg.priming.score_with,
            student_tokenizer=student_path if teacher_toks else None)
        ray.get(pool.ready_refs())
        summary = generate_with(pool, cfg, requests, skipped, out_dir, stamp, shard_size, progress)
        for w in pool.workers:
            ray.kill(w)
    finally:
        if started:
            ray.shutdown()
    return summary


def _text_path_student(cfg, cache, teacher_tok) -> tuple[str | None, dict | None]:
    """``models.student``'s dir and ``{'default': the teacher's tokenizer}`` when the student has another
    tokenizer: the dataset is then written on the text path, in the student's tokens (SeqKD across
    tokenizers; docs/teachers.md). (None, None): the rows are in the teacher's tokens."""
    from transformers import AutoTokenizer

    from driver.prepare import same_tokenizer
    from kd.models import resolve_model

    if cfg.models.student is None:  # cut from the teacher: its tokenizer
        return None, None
    student = str(resolve_model(cfg.models.student, cache))
    student_tok = AutoTokenizer.from_pretrained(student, **hf_kwargs())
    if same_tokenizer(teacher_tok, student_tok):
        return student, None
    print(f"raykd: text path: models.teacher (tokenizer vocab {len(teacher_tok)}) and models.student (tokenizer "
          f"vocab {len(student_tok)}) use different tokenizers; the teacher's answers are written re-tokenized "
          "for the student, usable by loss.type sft or dpkd", file=sys.stderr)
    return student, {"default": teacher_tok}


def generate_with(pool, cfg, requests: list[dict], skipped: int, out_dir: str | Path, stamp: dict,
                  shard_size: int = 64, progress: bool = True) -> dict:
    """Write the teacher rows of ``requests`` with a running ``pool`` into ``out_dir``: the shared core
    of ``raykd generate`` and of an offline phase whose dataset the run generates itself. Finished
    shards are kept (a re-run resumes); a directory made with other settings is refused."""
    import ray
    from tqdm import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    identity = _identity(cfg, len(requests), shard_size)
    _check_manifest(out, identity, stamp)
    (out / MANIFEST).write_text(json.dumps({"identity": identity, "teacher_model": stamp,
                                            "skipped_overlong": skipped}, indent=1))
    shards = [requests[i : i + shard_size] for i in range(0, len(requests), shard_size)]
    todo = [i for i in range(len(shards)) if not (out / shard_name(i)).exists()]
    done_rows = sum(len(shards[i]) for i in range(len(shards)) if i not in todo)
    bar = tqdm(total=len(requests), initial=done_rows, desc="generate", unit="prompt",
               disable=not progress, dynamic_ncols=True)
    # big engine calls: an engine batches the prompts of one call together, which is far faster per
    # token than calls of a sampler request's size; every replica still gets at least two calls
    per_call = -(-len(requests) // (2 * len(pool.workers))) if requests else 1
    per_request = max(cfg.sampler.prompts_per_request, min(shard_size, per_call))
    pending: dict = {}  # ref -> (shard, part)
    parts: dict[int, dict[int, pa.Table]] = {i: {} for i in todo}
    n_parts = {i: (len(shards[i]) + per_request - 1) // per_request for i in todo}
    queue = [(i, j) for i in todo for j in range(n_parts[i])]
    window = 2 * len(pool.workers)
    while queue or pending:
        while queue and len(pending) < window:
            i, j = queue.pop(0)
            batch = shards[i][j * per_request : (j + 1) * per_request]
            pending[pool.submit(batch, None)] = (i, j)
        ready, _ = ray.wait(list(pending), num_returns=1)
        for ref in ready:
            i, j = pending.pop(ref)
            pool.done(ref)
            parts[i][j] = ray.get(ref)
            bar.update(parts[i][j].num_rows)
            if len(parts[i]) == n_parts[i]:
                _write_shard(out / shard_name(i), [parts[i][k] for k in range(n_parts[i])])
                del parts[i]
    bar.close()
    return {"out": str(out), "shards": len(shards), "written": len(todo), "prompts": len(requests),
            "skipped_overlong": skipped}


def _write_shard(path: Path, tables: list[pa.Table]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(pa.concat_tables(tables), tmp)
    os.replace(tmp, path)  # atomic: the final name only ever holds a complete shard


def read_dataset(path: str | Path) -> pa.Table:
    """All rows of a generated dataset, validated against the buffer schema."""
    root = Path(path)
    if not (root / MANIFEST).is_file():
        raise DatasetError(f"{root}: not a raykd dataset (no {MANIFEST}; create one with raykd generate)")
    files = sorted(root.glob("shard-*.parquet"))
    if not files:
        raise DatasetError(f"{root}: the dataset has no shards")
    tables = []
    for f in files:
        try:
            t = with_optional_columns(pq.read_table(f))
        except (pa.ArrowInvalid, OSError) as e:
            raise DatasetError(f"{f}: not a readable Parquet shard: {e}") from None
        missing = [n for n in BUFFER_SCHEMA.names if n not in t.column_names]
        if missing:
            raise DatasetError(f"{f}: missing field(s) {', '.join(missing)}")
        tables.append(t.select(BUFFER_SCHEMA.names).cast(BUFFER_SCHEMA))
    return pa.concat_tables(tables)


def check_dataset_teacher(data: str, where: str, loss: str, tok, vocab_size: int | None, field: str = "data") -> None:
    """Before any actor starts: the dataset's teacher shares this run's student's tokenizer (and, for
    a token-level loss, its vocab_size). A mismatch otherwise fails as an IndexError in the learner."""
    from kd.vocab import CROSS_TOKENIZER_LOSSES, TOKEN_LEVEL_LOSSES, tokenizer_fingerprint

    stamp = json.loads((Path(data).expanduser() / MANIFEST).read_text()).get("teacher_model")
    if not stamp:
        _check_unstamped(data, where, vocab_size, field)
        return
    if stamp.get("text_path") and loss not in CROSS_TOKENIZER_LOSSES:
        raise DatasetError(f"{where}.{field}={data}: written on the text path (a teacher with another tokenizer: "
                           f"no per-token teacher log-probs), but {where}.loss.type={loss} needs them; use "
                           f"{' or '.join(CROSS_TOKENIZER_LOSSES)}")
    fp = tokenizer_fingerprint(tok)
    wrote = f"teacher {stamp.get('path')} (tokenizer {stamp.get('tokenizer_fingerprint')}, vocab_size {stamp.get('vocab_size')})"
    if stamp.get("tokenizer_fingerprint") != fp:
        raise DatasetError(f"{where}.{field}={data}: generated with {wrote}, but this run's student has tokenizer "
                           f"{fp}, vocab_size {vocab_size}; regenerate it with raykd generate and this run's models")
    if loss in TOKEN_LEVEL_LOSSES and vocab_size is not None and stamp.get("vocab_size") != vocab_size:
        raise DatasetError(f"{where}.{field}={data}: generated with {wrote}, but this run's student has vocab_size "
                           f"{vocab_size}; {where}.loss.type={loss} compares distributions over the vocabulary "
                           "and needs equal sizes (use sft, or regenerate with a teacher of equal vocab_size)")


def _check_unstamped(data: str, where: str, vocab_size: int | None, field: str = "data") -> None:
    """Datasets written before the teacher stamp: a warning, and the one check their shards allow,
    every token id inside the student's embedding (what the learner would index)."""
    import pyarrow.compute as pc

    print(f"raykd: warning: {where}.{field}={data}: manifest.json has no teacher stamp (written by an older "
          "raykd), so only its token ids are checked against the student; regenerate it to have its "
          "tokenizer checked", file=sys.stderr)
    if vocab_size is None:
        return
    table = read_dataset(data)
    for name in ("prompt_ids", "chosen_ids", "chosen_topk_ids"):
        col = table.column(name)
        while pa.types.is_list(col.type):
            col = pc.list_flatten(col)
        top = pc.max(col).as_py()
        if top is not None and top >= vocab_size:
            raise DatasetError(f"{where}.{field}={data}: {name} holds token id {top}, past this run's student's "
                               f"vocab_size {vocab_size}: it was generated with another tokenizer; regenerate "
                               "it with raykd generate and this run's models")


# the settings a teacher dataset must share with a run to stand in for its teacher's answers
ANSWER_SETTINGS = ("priming", "priming_template", "priming_wording", "priming_placement", "score_with")


def answers_source(phases, i: int) -> str | None:
    """The dataset that ``phases[i].teacher_answers`` names: a directory, or for ``offline`` the last
    offline phase's ``data`` before it (None: the run's own teacher-data)."""
    name = phases[i].teacher_answers
    if name != "offline":
        return name
    return next(p.data for p in reversed(phases[:i]) if p.kind == "offline")


def check_teacher_answers(cfg, data: str, where: str, loss, tok, vocab_size: int | None, teacher_path: str) -> None:
    """Before any actor starts: ``data`` was written by this run's teacher, from prompts primed as this
    run primes them, with the top-k its loss reads; else its y_t would answer another question or come
    from another model than the one that scores y_s."""
    from kd.objective import loss_needs

    field = "teacher_answers"
    check_dataset_teacher(data, where, loss.type, tok, vocab_size, field)
    manifest = json.loads((Path(data).expanduser() / MANIFEST).read_text())
    made, stamp = manifest.get("identity", {}), manifest.get("teacher_model") or {}
    if stamp.get("text_path"):
        raise DatasetError(f"{where}.{field}={data}: written on the text path (re-tokenized for another "
                           "student); a teacher's answers are reused in the teacher's own tokens only")
    if made.get("teacher") != cfg.models.teacher and stamp.get("path") != teacher_path:
        raise DatasetError(f"{where}.{field}={data}: generated by teacher {made.get('teacher')!r}, but this run's "
                           f"teacher is {cfg.models.teacher!r}, which scores the student's samples against it")
    ours = _identity(cfg, 0, 0)
    diff = [k for k in ANSWER_SETTINGS if made.get(k) != ours[k]]
    if diff:
        raise DatasetError(f"{where}.{field}={data}: generated with other priming settings ("
                           + ", ".join(f"priming {k}: {made.get(k)!r}, this run {ours[k]!r}" for k in diff)
                           + "); regenerate it with this run's priming")
    needs = loss_needs(loss)
    if needs["teacher_topk"] and needs["teacher_scores_y_t"] and made.get("top_k_logprobs", 0) < ours["top_k_logprobs"]:
        raise DatasetError(f"{where}.{field}={data}: holds the teacher's top-{made.get('top_k_logprobs')} log-probs, "
                           f"but loss.type={loss.type} reads the top-{ours['top_k_logprobs']} "
                           "(teacher.top_k_logprobs); regenerate it or lower teacher.top_k_logprobs")


def load_answers(path: str | Path) -> dict[str, tuple[list[int], dict]]:
    """A teacher dataset's answers by prompt id, each as (the primed prompt's ids, the answer): the answer
    is what a teacher needs to use it instead of generating one (``TeacherWorker.make_pairs``); the ids
    let the caller check that the row answers the very prompt it is used for."""
    table = read_dataset(path)
    cols = ("chosen_ids", "chosen_teacher_logps", "chosen_topk_ids", "chosen_topk_logps")
    data = {c: table.column(c).to_pylist() for c in ("prompt_id", "teacher_prompt_ids", *cols)}
    return {pid: (data["teacher_prompt_ids"][j], {c: data[c][j] for c in cols})
            for j, pid in enumerate(data["prompt_id"])}


def dataset_fingerprint(path: str | Path) -> str:
    h = hashlib.sha256()
    for f in sorted(Path(path).glob("shard-*.parquet")):
        h.update(f.name.encode() + str(f.stat().st_size).encode())
    return h.hexdigest()[:16]


def _generate_cmd(args) -> int:
    from driver.config import check_paths, load_config

    # the schedule's offline datasets are what this command writes: they need not exist yet
    cfg = check_paths(load_config(args.config, args.set, check_files=False), datasets=False)
    summary = generate_dataset(cfg, args.out, args.shard_size, progress=not args.no_progress)
    print(json.dumps(summary, indent=1))
    return 0


def register(sub) -> None:
    g = sub.add_parser("generate", help="run the teacher pool over a prompt dataset into Parquet shards")
    g.add_argument("config")
    g.add_argument("--out", required=True, help="output directory (re-running it resumes)")
    g.add_argument("--set", action="append", default=[], metavar="dotted.key=value")
    g.add_argument("--shard-size", type=int, default=64, help="prompts per Parquet shard")
    g.add_argument("--no-progress", action="store_true")
    g.set_defaults(func=_generate_cmd)


if __name__ == "__main__":
    from driver.cli import main

    sys.exit(main(["generate", *sys.argv[1:]]))
