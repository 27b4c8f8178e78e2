"""Metrics recorded by the actors (and the driver) are readable from Ray's Prometheus endpoint.

This needs a Ray instance started with a known metrics export port and a short report interval, so
it runs in a subprocess with its own local cluster: the session ``ray_cluster`` fixture (other
options, maybe already running in this process) is left alone.
"""

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

SCRIPT = textwrap.dedent('''
    import json, socket, sys, time, urllib.request

    import pyarrow as pa
    import ray

    from actors import metrics
    from actors.replay_buffer import ReplayBuffer
    from actors.student_sampler import StudentSampler
    from kd.data import BUFFER_SCHEMA

    model_path = sys.argv[1]
    s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
    ray.init(address="local", num_cpus=3, include_dashboard=False, log_to_driver=False, configure_logging=False,
             _metrics_export_port=port, _system_config={"metrics_report_interval_ms": 500},
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    assert ray._private.worker.global_worker.node.metrics_export_port == port

    sampler = ray.remote(StudentSampler).options(name="sampler-0", num_cpus=1).remote(
        0, model_path, "hf", {"num_threads": 1}, {"max_new_tokens": 4, "temperature": 1.0, "top_p": 1.0})
    buffer = ray.remote(ReplayBuffer).options(name="replay-buffer", num_cpus=0).remote(16, 2)
    n = 3
    rows = {f.name: [[] for _ in range(n)] for f in BUFFER_SCHEMA if pa.types.is_list(f.type)}
    rows.update(prompt_id=[f"p{i}" for i in range(n)], policy_version=[0] * n, priming=["none"] * n,
                created_at=[0.0] * n, reference_answer=[None] * n, teacher_name=[None] * n,
                chosen_teacher_logp_sum=[None] * n, rejected_teacher_logp_sum=[None] * n)
    assert ray.get(buffer.add.remote(pa.Table.from_pydict(rows, schema=BUFFER_SCHEMA))) == n
    gens = ray.get(sampler.generate.remote([{"prompt_ids": [1, 30, 40]}, {"prompt_ids": [1, 31]}], seed=0))
    health = {key: 0.125 * (i + 1) for i, key in enumerate(metrics.HEALTH_GAUGES)}
    metrics.record_step({"loss": 0.625, "policy_lag": 1.0, "weight_sync_s": 0.25, **health})

    wanted = {"ray_" + name for name in metrics.NAMES}  # every metric raykd defines, as Ray exports it
    found, deadline = {}, time.monotonic() + 25
    while time.monotonic() < deadline and set(found) != wanted:
        try:
            body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
        except OSError:
            body = ""
        for line in body.splitlines():
            name = line.split("{", 1)[0]
            if name in wanted:
                tags = dict(kv.split("=", 1) for kv in line.split("{", 1)[1].rsplit("}", 1)[0].split('",')
                            if "=" in kv)
                found[name] = {"actor": tags.get("actor", "").strip('"'), "value": float(line.rsplit(" ", 1)[1])}
        time.sleep(0.25)
    print("RESULT " + json.dumps({"found": found, "port": port, "health": health,
                                  "tokens": sum(len(g.token_ids) for g in gens)}))
    ray.shutdown()
''')


@pytest.mark.slow
def test_actor_metrics_reach_the_prometheus_endpoint(tiny_models, tmp_path):
    script = tmp_path / "emit_metrics.py"
    script.write_text(SCRIPT)
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "RAY_ADDRESS": "", "TOKENIZERS_PARALLELISM": "false"}
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, str(script), tiny_models["student"]], cwd=root, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    result = json.loads(line[len("RESULT "):])
    found = result["found"]
    assert found["ray_raykd_buffer_size"] == {"actor": "replay-buffer", "value": 3.0}
    assert found["ray_raykd_samples_generated_total"] == {"actor": "sampler-0", "value": 2.0}
    assert found["ray_raykd_tokens_per_second"]["actor"] == "sampler-0"
    assert found["ray_raykd_tokens_per_second"]["value"] > 0 and result["tokens"] > 0
    assert found["ray_raykd_learner_loss"] == {"actor": "learner-group", "value": 0.625}
    assert found["ray_raykd_policy_lag"]["value"] == 1.0
    assert found["ray_raykd_weight_sync_seconds"]["value"] == 0.25
    assert found["ray_raykd_buffer_capacity"] == {"actor": "replay-buffer", "value": 16.0}
    from actors.metrics import HEALTH_GAUGES, NAMES

    assert set(found) == {"ray_" + name for name in NAMES}  # every metric raykd defines is exported
    for key, name in HEALTH_GAUGES.items():
        assert found["ray_" + name] == {"actor": "learner-group", "value": result["health"][key]}, key
    print(f"metrics subprocess took {time.perf_counter() - t:.1f}s")
