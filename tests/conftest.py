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
def tiny_teacher_other_tokenizer(tmp_path_factory):
    """A 2-layer tiny teacher whose tokenizer is not the tiny students' (vocab 320, other merges)."""
    from kd.models import make_tiny_model

    return str(make_tiny_model(tmp_path_factory.mktemp("models_x") / "teacher_x", num_layers=2, seed=3,
                               tokenizer_vocab=320))


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray cluster shared by the integration tests."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=6, include_dashboard=False, log_to_driver=False,
                 configure_logging=False, runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def write_dataset():
    """A function writing a one-row offline dataset as `raykd generate` does (``stamp``: the manifest's
    teacher_model; None: a manifest from before the stamp)."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    def write(path, stamp, token_id=5):
        """A one-row offline dataset as `raykd generate` writes it; ``stamp=None``: an older manifest."""
        from driver.offline import MANIFEST, shard_name
        from kd.data import BUFFER_SCHEMA

        path.mkdir()
        manifest = {"identity": {}, **({"teacher_model": stamp} if stamp else {})}
        (path / MANIFEST).write_text(json.dumps(manifest))
        row = {"prompt_id": "p0", "prompt_ids": [1, 2], "teacher_prompt_ids": [1, 2], "chosen_ids": [token_id, 3],
               "rejected_ids": [], "chosen_teacher_logps": [-1.0, -1.0], "rejected_teacher_logps": [],
               "chosen_topk_ids": [[token_id], [3]], "chosen_topk_logps": [[-1.0], [-1.0]],
               "rejected_topk_ids": [], "rejected_topk_logps": [], "rejected_behaviour_logps": [],
               "policy_version": -1, "priming": "none", "created_at": 0.0, "reference_answer": None}
        pq.write_table(pa.Table.from_pylist([row], schema=BUFFER_SCHEMA), path / shard_name(0))
        return str(path)

    return write
