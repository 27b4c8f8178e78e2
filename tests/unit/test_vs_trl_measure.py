"""The measuring parts of benchmarks/vs_trl.py: the steady-state rate and a process tree's peak memory."""

import subprocess
import sys
import textwrap
import time

import pytest
from benchmark_modules import load_benchmark


def _vs_trl():
    return load_benchmark("vs_trl")


def test_steady_rate_leaves_out_the_first_steps():
    vs = _vs_trl()
    # step ends at 10 s (start-up), then one step every 2 s: 4 samples per 2 s after the first step
    times = [10.0, 12.0, 14.0, 16.0, 18.0]
    assert vs.steady_samples_per_s(times, 4, 1) == pytest.approx(4 * 4 / 8.0)
    assert vs.steady_samples_per_s(times, 4, 3) == pytest.approx(4 * 2 / 4.0)
    with pytest.raises(SystemExit):
        vs.steady_samples_per_s([3.0], 4, 1)


def test_tree_memory_sums_a_process_and_its_grandchild():
    vs = _vs_trl()
    mb = 300
    # the grandchild holds `mb` MB (written, so resident); its parent is a plain sleeping Python
    grandchild = f"b = bytearray({mb} * 2**20); b[::4096] = b'x' * len(b[::4096]); import time; time.sleep(4)"
    child = textwrap.dedent(f"""
        import subprocess, sys
        subprocess.run([sys.executable, "-c", {grandchild!r}])
    """)
    proc = subprocess.Popen([sys.executable, "-c", child])
    mem = vs.TreeMemory(proc.pid, interval=0.1, pss_every=5)
    proc.wait()
    time.sleep(0.2)
    peak = mem.stop()
    # more than the grandchild's buffer: two interpreters on top of it
    assert peak["peak_rss_mb"] > mb + 5
    assert mb < peak["peak_pss_mb"] <= peak["peak_rss_mb"]
    # by part at the peak: the root is the driver; its child and grandchild are named by their program
    roles = peak["rss_mb_at_peak_by_role"]
    assert roles["driver"] < mb < sum(v for k, v in roles.items() if k != "driver")
    assert sum(roles.values()) == pytest.approx(peak["peak_rss_mb"], rel=1e-6)
    # the machine's used memory over idle is measured too; it moves with whatever else runs on the
    # machine, so only the integration test (a whole Ray run) bounds it
    assert "peak_used_over_idle_mb" in peak
