"""benchmarks/engines.py at a tiny size: both engines generate and score the same prompts, and the
scoring-path table covers every requested length with a positive rate for each path."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.vllm
def test_engines_benchmark_tiny(tmp_path):
    pytest.importorskip("vllm")
    proc = subprocess.run([sys.executable, "benchmarks/engines.py", "--model", "tiny", "--batch-sizes", "2",
                           "--max-new-tokens", "4", "--top-k", "4", "--repeats", "1",
                           "--score-lengths", "16,64", "--score-batch", "2"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    for call in ("generate", "score"):
        row = re.search(rf"^{call}\s+2\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)x$", out, re.M)
        assert row and all(float(x) > 0 for x in row.groups()), out
    lengths = {int(m[0]): (float(m[1]), float(m[2]), float(m[3]))
               for m in re.findall(r"^\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)x$", out, re.M)}
    assert set(lengths) == {16, 64}, out
    for hf, vllm, ratio in lengths.values():
        assert hf > 0 and vllm > 0 and ratio == pytest.approx(vllm / hf, rel=0.02, abs=0.006)
