"""cluster.yaml is a real Ray cluster-launcher config: it validates against Ray's own schema."""

import json
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def schema():
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


@pytest.fixture(scope="module")
def cluster():
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_cluster_yaml_matches_ray_schema(schema, cluster):
    jsonschema.validate(cluster, schema)


def test_schema_rejects_a_broken_copy(schema, cluster):
    broken = dict(cluster, available_node_types={"head": {"resources": {}}})  # no node_config
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


def test_node_types_for_teachers_and_learners(cluster):
    types = cluster["available_node_types"]
    assert cluster["head_node_type"] in types
    assert any("raykd_inference" in t["resources"] for t in types.values())
    assert any("raykd_learner" in t["resources"] for t in types.values())
    setup = " ".join(cluster["setup_commands"])
    assert "[gpu" in setup  # installs raykd with the CUDA vLLM extra
