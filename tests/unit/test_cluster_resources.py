"""What a run asks of the cluster, and the fail-fast check against the nodes' resources (pure: the
nodes are given as dicts, no Ray)."""

import pytest

from driver.cluster import (ResourceError, _pack, actor_demands, check_resources, placement_problems,
                            requested_resources)
from driver.config import Config


def config(n_learners=2, learner_res=None, learner_cpus=1.0, learner_gpus=0.0, teachers=1, samplers=1,
           inference_res=None) -> Config:
    cfg = Config()
    cfg.learner.num_learners = n_learners
    cfg.learner.num_cpus, cfg.learner.num_gpus = learner_cpus, learner_gpus
    cfg.learner.resources = dict(learner_res or {})
    cfg.teacher.num_replicas, cfg.sampler.num_replicas = teachers, samplers
    cfg.teacher.engine.resources = dict(inference_res or {})
    cfg.sampler.engine.resources = dict(inference_res or {})
    return cfg


HEAD = {"CPU": 2.0, "memory": 1e9, "node:10.0.0.1": 1.0}
INFERENCE = {"CPU": 2.0, "raykd_inference": 2.0}
LEARNER = {"CPU": 2.0, "raykd_learner": 2.0}


def test_demands_and_totals():
    cfg = config(n_learners=2, learner_res={"raykd_learner": 1}, learner_gpus=0.5, inference_res={"raykd_inference": 1})
    demands = dict(actor_demands(cfg))
    assert set(demands) == {"teacher-0", "sampler-0", "learner-0", "learner-1"}
    assert demands["learner-1"] == {"CPU": 1.0, "GPU": 0.5, "raykd_learner": 1.0}
    assert demands["teacher-0"] == {"CPU": 1.0, "raykd_inference": 1.0}  # zero GPU left out
    assert requested_resources(cfg) == {"CPU": 4.0, "GPU": 1.0, "raykd_learner": 2.0, "raykd_inference": 2.0}


def test_a_cluster_that_fits():
    cfg = config(n_learners=2, learner_res={"raykd_learner": 2}, inference_res={"raykd_inference": 1})
    # 2 learners x {raykd_learner: 2}: one per node on two learner nodes
    check_resources(cfg, [HEAD, INFERENCE, LEARNER, LEARNER])


def test_one_actor_bigger_than_any_node_fails_though_the_total_fits():
    cfg = config(n_learners=1, learner_res={"raykd_learner": 3}, teachers=0, samplers=0)
    with pytest.raises(ResourceError) as e:
        check_resources(cfg, [HEAD, LEARNER, LEARNER])  # 4 raykd_learner in all, 2 per node
    msg = str(e.value)
    assert "learner-0 requests {CPU: 1, raykd_learner: 3} on one node" in msg
    assert "available per node at most {CPU: 2, raykd_learner: 2}" in msg


def test_totals_short_lists_requested_against_available():
    cfg = config(n_learners=3, learner_res={"raykd_learner": 1})
    with pytest.raises(ResourceError, match=r"raykd_learner: requested 3, available 2") as e:
        check_resources(cfg, [HEAD, INFERENCE, LEARNER])
    assert "CPU: requested 5, available 6" not in str(e.value)  # only what is short is listed


def test_missing_custom_resource_is_named():
    cfg = config(n_learners=1, learner_res={"raykd_learner": 1})
    with pytest.raises(ResourceError, match=r"raykd_learner: requested 1, available 0"):
        check_resources(cfg, [HEAD])


def test_fragmentation_fails_although_totals_and_each_actor_fit():
    # 3 actors of {CPU: 1.5}: each fits a 2-CPU node, 4.5 <= 6 CPUs, but two never share a node
    demands = [(f"learner-{i}", {"CPU": 1.5}) for i in range(3)]
    problems = placement_problems(demands, [{"CPU": 2.0}] * 3)
    assert problems == []
    problems = placement_problems(demands, [{"CPU": 2.0}, {"CPU": 2.0}, {"CPU": 1.0}, {"CPU": 1.0}])
    assert len(problems) == 1 and "do not fit together" in problems[0]


def test_packing_search_finds_a_non_greedy_placement():
    # first-fit by size would put the 2-CPU actor on the 3-CPU node and strand a GPU actor
    demands = [("a", {"CPU": 2.0}), ("b", {"CPU": 1.0, "GPU": 1.0}), ("c", {"CPU": 1.0, "GPU": 1.0})]
    nodes = [{"CPU": 3.0, "GPU": 2.0}, {"CPU": 2.0}]
    assert placement_problems(demands, nodes) == []


def test_gpu_learners_on_cpu_nodes_fail():
    cfg = config(n_learners=1, learner_gpus=1.0, teachers=0, samplers=0)
    with pytest.raises(ResourceError, match=r"GPU: requested 1, available 0"):
        check_resources(cfg, [HEAD, LEARNER])


def test_search_budget_gives_up_without_blocking_the_run():
    # 10 distinct actors, 9 distinct nodes that hold one each: infeasible, but proving it means
    # trying ~9! placements; past the budget the check stays silent and Ray's own placement decides
    demands = [(f"x{i}", {"CPU": 1.1 + 0.01 * i}) for i in range(10)]
    nodes = [{"CPU": 2.0 + 0.001 * j} for j in range(9)]
    assert _pack(sorted((tuple(d.values()) for _, d in demands), reverse=True),
                 [tuple(n.values()) for n in nodes], 1000) is None
    assert placement_problems(demands, nodes, max_search=1000) == []
    assert _pack([(2.0,), (1.0,)], [(2.0,), (1.0,)], 1000) is True
    assert _pack([(2.0,), (2.0,)], [(2.0,), (1.0,)], 1000) is False


@pytest.mark.parametrize("nodes, cpus, expect", [
    (["a"], [2], [2]),  # one rank alone on a 2-core machine: both cores
    (["a", "a", "b"], [8, 8, 4], [4, 4, 4]),  # two ranks share node a's 8 CPUs; b's rank has its 4
    (["a", "a", "a"], [2, 2, 2], [1, 1, 1]),  # more ranks than CPUs: never 0 threads
    (["a", "a"], [7, 7], [3, 3]),  # an odd count rounds down: no oversubscription
])
def test_auto_offline_threads_split_each_nodes_cpus_among_its_ranks(nodes, cpus, expect):
    from actors.learner_group import auto_threads

    assert auto_threads(nodes, cpus) == expect
