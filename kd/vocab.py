"""Vocabulary identity of a model: its embedding size, its tokenizer's fingerprint, and which losses
need teacher and student to agree on them.

Checked before any actor starts, because a mismatch otherwise surfaces minutes later as an index error
deep inside vLLM or the learner.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from kd.errors import UserInputError

# Losses that compare the two models' distributions over the vocabulary, position by position (or
# index the student's logits with the teacher's top-k ids): both must have the same vocab_size.
# The others (dpkd, sft, pg_rkl) only score token sequences, so padding rows may differ.
TOKEN_LEVEL_LOSSES = ("fkl", "rkl", "jsd", "skew_fkl", "skew_rkl", "tvd", "dpkd_token")
SEQUENCE_LEVEL_LOSSES = ("dpkd", "sft", "pg_rkl")
# Across tokenizers (the text path, docs/teachers.md) only what needs no token alignment: dpkd reads the
# teacher's log-prob of each response's text as one sum, sft the teacher's text re-tokenized, pg_rkl
# the teacher's log-prob of y_s's text as one sequence-level reward.
CROSS_TOKENIZER_LOSSES = SEQUENCE_LEVEL_LOSSES


class VocabError(UserInputError):
    pass


def model_vocab_size(model_dir: str | Path) -> int | None:
    """Rows of the embedding, from config.json (multimodal configs keep it under text_config)."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    size = cfg.get("vocab_size") or (cfg.get("text_config") or {}).get("vocab_size")
    return int(size) if size else None


def tokenizer_fingerprint(tok) -> str:
    """A short hash of the token -> id mapping and the special tokens: equal for two checkpoints that
    share a tokenizer (e.g. Qwen2.5-7B and -0.5B), whatever their embedding padding."""
    specials = sorted((str(k), str(v)) for k, v in tok.special_tokens_map.items())
    payload = json.dumps([sorted(tok.get_vocab().items()), specials], ensure_ascii=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def check_embedding_covers_tokenizer(model_dir: str | Path, tok) -> int | None:
    """A token id past the embedding crashes the engine and the learner: refuse such a model."""
    size = model_vocab_size(model_dir)
    if size is not None and size < len(tok):
        raise VocabError(f"{model_dir}: its embedding has {size} rows (config.json vocab_size) but its "
                         f"tokenizer has {len(tok)} tokens; the embedding must cover every token id")
    return size


def _phase_losses(cfg) -> list[tuple[str, str]]:
    """('schedule[i].loss.type' (or 'loss.type' without a schedule), NAME) for each phase of the run."""
    return [(f"schedule[{i}].loss.type" if cfg.schedule else "loss.type", ph.loss.type)
            for i, ph in enumerate(cfg.phases())]


def token_level_losses(cfg) -> list[str]:
    """'WHERE=NAME' for each phase of the run whose loss needs equal vocabularies."""
    return [f"{where}={t}" for where, t in _phase_losses(cfg) if t in TOKEN_LEVEL_LOSSES]


def cross_tokenizer_refusals(cfg) -> list[str]:
    """'WHERE=NAME' for each phase whose loss cannot work across tokenizers (anything outside
    ``CROSS_TOKENIZER_LOSSES``)."""
    return [f"{where}={t}" for where, t in _phase_losses(cfg) if t not in CROSS_TOKENIZER_LOSSES]


def retokenize(ids: list[int], stopped: bool, src, dst) -> list[int]:
    """A response in ``src``'s token ids as ``dst``'s, through its text. ``stopped``: it ended with
    ``src``'s EOS, which is dropped before decoding (its text never reaches ``dst``) and replaced by
    ``dst``'s EOS; a truncated response gets no EOS. Special tokens are control, not text: dropped."""
    if stopped and ids and ids[-1] == src.eos_token_id:
        ids = ids[:-1]
    text = src.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    out = list(dst.encode(text, add_special_tokens=False))
    return out + [dst.eos_token_id] if stopped else out


def check_vocab_sizes(what_a: str, size_a: int | None, what_b: str, size_b: int | None, cfg) -> None:
    """Sizes that differ only by padding are fine for sequence-level losses, not for token-level ones."""
    if size_a is None or size_b is None or size_a == size_b:
        return
    bad = token_level_losses(cfg)
    if bad:
        raise VocabError(f"{what_a} has vocab_size {size_a} but {what_b} has {size_b}: {', '.join(bad)} "
                         f"compares distributions over the vocabulary and needs equal sizes; with these "
                         f"models use {', '.join(SEQUENCE_LEVEL_LOSSES)}")
