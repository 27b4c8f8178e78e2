"""kd.models.release_freed_memory: the heap that freed objects leave behind goes back to the OS (the
driver calls it after converting the embedded teacher or cutting the student from it)."""

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_freed_heap_goes_back_to_the_os():
    # In a fresh interpreter: 400 MB of 1 kB objects (malloc's heap, not pymalloc's arenas), one in 64 kept
    # so the heap cannot shrink from its top by itself; the RSS is read before and after the release.
    code = textwrap.dedent(f"""
        import sys, psutil
        sys.path.insert(0, {str(ROOT)!r})
        from kd.models import release_freed_memory
        rss = lambda: psutil.Process().memory_info().rss / 2**20
        xs = [bytes(1000) + bytes([i % 256]) for i in range(400_000)]
        keep = xs[::64]
        del xs
        before = rss()
        release_freed_memory()
        print(before, rss(), len(keep))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    before, after, kept = out.stdout.split()
    assert float(before) > 300  # the freed objects' pages were still resident
    assert float(before) - float(after) > 250, out.stdout  # most of them were given back
