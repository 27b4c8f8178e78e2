"""`ray.include_dashboard=true`: raykd prints the dashboard's address and how to get the token, and the
dashboard's API, with Ray's token authentication on (the default for a new local cluster), lists the
run's named actors only to a client that sends the token."""

import json
import os
import re
import secrets
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SCRIPT = textwrap.dedent("""
    import sys
    import ray
    from driver.cluster import create_actors, start_ray
    from driver.config import load_config

    teacher, student, cache = sys.argv[1:4]
    cfg = load_config(None, [f"models.teacher={teacher}", f"models.student={student}",
                             f"models.cache_dir={cache}", "ray.include_dashboard=true", "ray.num_cpus=6",
                             "teacher.engine.backend=hf", "sampler.engine.backend=hf"])
    start_ray(cfg)
    actors = create_actors(cfg, teacher, student)
    print("READY", flush=True)
    sys.stdin.readline()  # until the test has read the dashboard
    actors.shutdown()
    ray.shutdown()
""")


def _get(url, token=None):
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_dashboard_lists_the_named_actors_with_the_token(tiny_models, tmp_path):
    token = secrets.token_hex(16)
    (tmp_path / "token").write_text(token)
    # this test's own token file (Ray reads RAY_AUTH_TOKEN_PATH before ~/.ray/auth_token); RAY_AUTH_MODE
    # unset, as for a new user: the local cluster turns token authentication on by itself
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_ADDRESS")}
    env["RAY_AUTH_TOKEN_PATH"] = str(tmp_path / "token")
    root = Path(__file__).resolve().parents[2]
    env["PYTHONPATH"] = str(root)
    err = open(tmp_path / "stderr", "w+")
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, tiny_models["teacher"], tiny_models["student"],
                             str(tmp_path / "cache")], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=err, text=True, env=env, cwd=root)
    try:
        assert proc.stdout.readline().strip() == "READY", (tmp_path / "stderr").read_text()[-3000:]
        note = [line for line in (tmp_path / "stderr").read_text().splitlines()
                if line.startswith("raykd: Ray dashboard at ")]
        assert len(note) == 1, (tmp_path / "stderr").read_text()[-3000:]
        url = re.match(r"raykd: Ray dashboard at (http://\S+) \(token authentication is on: ", note[0]).group(1)
        assert "`ray get-auth-token`" in note[0] and str(tmp_path / "token") in note[0]

        # the token the note points to, as a user gets it
        ray_cli = Path(sys.executable).parent / "ray"
        printed = subprocess.run([str(ray_cli), "get-auth-token"], env=env, capture_output=True, text=True,
                                 timeout=60, check=True).stdout.strip()
        assert printed == token

        api = f"{url}/api/v0/actors?limit=100"
        assert _get(api) == (401, "Unauthorized: Missing authentication token")
        assert _get(api, "not-the-token")[0] == 403
        deadline = time.time() + 60
        while True:  # the state API answers once the dashboard has caught up with the actors
            status, body = _get(api, printed)
            names = set()
            if status == 200:
                data = json.loads(body)["data"]["result"]["result"]
                names = {a.get("name") for a in data if a.get("state") == "ALIVE"}
            if {"learner-0", "teacher-0", "sampler-0", "replay-buffer"} <= names or time.time() > deadline:
                break
            time.sleep(2)
        assert status == 200, body[:500]
        assert {"learner-0", "teacher-0", "sampler-0", "replay-buffer"} <= names
    finally:
        if proc.poll() is None:
            proc.stdin.write("\n")
            proc.stdin.flush()
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
        err.close()
