"""Placement: actors land on the node types the config asks for, on a multi-node Ray cluster made of
several Ray nodes on this machine (``ray.cluster_utils.Cluster``); runs that cannot fit fail fast.

The multi-node scenario runs in a subprocess (this file run as a script), so the session's local Ray
cluster (the ``ray_cluster`` fixture) is left as it is.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NODE_TYPES = {"head": {}, "inference": {"raykd_inference": 2}, "learner": {"raykd_learner": 2}}


@pytest.mark.slow
def test_actors_land_on_the_node_types_the_config_asks_for(tiny_models):
    args = json.dumps({"teacher": tiny_models["teacher"], "student": tiny_models["student"]})
    proc = subprocess.run([sys.executable, __file__, args], cwd=ROOT, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["teacher-0"] == "inference" and out["sampler-0"] == "inference"
    assert out["learner-0"].startswith("learner") and out["learner-1"].startswith("learner")
    assert out["learner-0"] != out["learner-1"]  # SPREAD over the two learner nodes
    assert out["pack"] == 1  # PACK puts both bundles on one node
    assert "learner-0 requests {CPU: 1, raykd_learner: 3} on one node" in out["too_big"]
    assert "available per node at most {CPU: 2, raykd_learner: 2}" in out["too_big"]
    assert "could not be placed" in out["pg_timeout"] and "raykd_learner: 3" in out["pg_timeout"]
    assert out["pg_timeout_s"] < 10


@pytest.mark.usefixtures("ray_cluster")
def test_learner_group_that_cannot_be_placed_fails_with_requested_and_available(tiny_models):
    from actors.learner_group import LearnerGroup, PlacementError
    from driver.config import LearnerConfig, LossConfig

    with pytest.raises(PlacementError) as e:
        LearnerGroup(2, {"num_cpus": 1, "resources": {"raykd_nowhere": 1}}, tiny_models["student"],
                     LearnerConfig(num_learners=2), LossConfig(), placement_timeout_s=1, name_prefix="nowhere")
    msg = str(e.value)
    assert "2 x {CPU: 1, raykd_nowhere: 1}" in msg and "requested {CPU: 2, raykd_nowhere: 2}" in msg
    assert "available {CPU:" in msg


# -- the scenario, in its own process ---------------------------------------------------------------


def _scenario(models: dict) -> dict:
    import time

    import ray
    from ray.cluster_utils import Cluster
    from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group

    from actors.learner_group import LearnerGroup, PlacementError
    from driver.cluster import ResourceError, check_resources, create_actors
    from driver.config import Config, LossConfig

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "include_dashboard": False, "object_store_memory": 150 << 20})
    kinds = {}
    for kind, res in [("inference", NODE_TYPES["inference"]), ("learner-a", NODE_TYPES["learner"]),
                      ("learner-b", NODE_TYPES["learner"])]:
        node = cluster.add_node(num_cpus=2, resources=res, object_store_memory=150 << 20)
        kinds[node.node_id] = kind
    ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
    cluster.wait_for_nodes()
    head_id = next(n["NodeID"] for n in ray.nodes() if n["NodeID"] not in kinds)
    kinds[head_id] = "head"
    out: dict = {}
    try:
        cfg = Config()
        cfg.teacher.engine.backend = cfg.sampler.engine.backend = "hf"  # quick engines for tiny models
        cfg.teacher.engine.resources = {"raykd_inference": 1}
        cfg.sampler.engine.resources = {"raykd_inference": 1}
        cfg.learner.resources = {"raykd_learner": 1}
        cfg.learner.num_learners, cfg.learner.batch_size = 2, 2
        cfg.learner.placement_strategy = "SPREAD"
        cfg.teacher.max_new_tokens = cfg.sampler.max_new_tokens = 4
        cfg.data.max_prompt_tokens = 16
        check_resources(cfg)
        actors = create_actors(cfg, models["teacher"], models["student"])

        def node_of(actor):
            return ray.get(actor.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id()))

        out["teacher-0"] = kinds[node_of(actors.teachers.workers[0])]
        out["sampler-0"] = kinds[node_of(actors.samplers[0])]
        for r, node in enumerate(actors.learners.node_ids()):
            out[f"learner-{r}"] = kinds[node]
        actors.shutdown()
        deadline = time.time() + 30  # killed actors hand their resources back asynchronously
        while ray.available_resources().get("raykd_learner", 0) < 4 and time.time() < deadline:
            time.sleep(0.2)

        pg = placement_group([{"CPU": 1, "raykd_learner": 1}] * 2, strategy="PACK")
        ray.get(pg.ready(), timeout=30)
        out["pack"] = len(set(placement_group_table(pg)["bundles_to_node_id"].values()))
        remove_placement_group(pg)

        cfg.learner.resources = {"raykd_learner": 3}
        cfg.learner.num_learners = 1
        try:
            check_resources(cfg)
        except ResourceError as e:
            out["too_big"] = str(e)
        t = time.perf_counter()
        try:  # the same request straight to a LearnerGroup: the placement group times out clearly
            LearnerGroup(1, {"num_cpus": 1, "resources": {"raykd_learner": 3}}, models["student"], cfg.learner,
                         LossConfig(), placement_timeout_s=2, name_prefix="toobig")
        except PlacementError as e:
            out["pg_timeout"] = str(e)
        out["pg_timeout_s"] = time.perf_counter() - t
    finally:
        ray.shutdown()
        cluster.shutdown()
    return out


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    print(json.dumps(_scenario(json.loads(sys.argv[1]))))
