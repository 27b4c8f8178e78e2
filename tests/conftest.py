import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """A 4-layer tiny teacher and two 2-layer tiny students (random, built from a config)."""
    from kd.models import make_tiny_model

    root = tmp_path_factory.mktemp("models")
    return {
        "teacher": str(make_tiny_model(root / "teacher", num_layers=4, seed=0)),
        "student": str(make_tiny_model(root / "student", num_layers=2, seed=1)),
        "student_b": str(make_tiny_model(root / "student_b", num_layers=2, seed=2)),
    }


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray cluster shared by the integration tests."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=6, include_dashboard=False, log_to_driver=False,
                 configure_logging=False, runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    yield ray
    ray.shutdown()
