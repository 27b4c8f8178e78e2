"""NCCL weight broadcast from learner rank 0 to samplers on GPUs (skipped without CUDA).

The same protocol runs on CPU with gloo in tests/integration/test_learner_group.py; this file checks
the NCCL backend object, CUDA buffers and stream synchronisation. It needs at least 2 GPUs (NCCL
refuses two ranks on one device): learner on one, each sampler on another.

NOT RUN where raykd was written (no GPU there): treat a first run on a GPU machine as its first test.
"""

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.device_count() < 2,
                       reason="needs 2 GPUs (one for the learner, one per sampler)"),
]


@pytest.fixture(scope="module")
def gpu_ray():
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=4, num_gpus=torch.cuda.device_count(), include_dashboard=False, log_to_driver=False)
    yield ray
    if started:
        ray.shutdown()


@pytest.mark.parametrize("zero_stage", [0, 3])
def test_nccl_broadcast_reaches_samplers_bit_exactly(gpu_ray, tiny_models, zero_stage):
    ray = gpu_ray
    from actors.learner_group import LearnerGroup
    from actors.student_sampler import StudentSampler
    from actors.weight_sync import WeightSync
    from driver.config import LearnerConfig, LossConfig

    n_samplers = min(2, torch.cuda.device_count() - 1)
    group = LearnerGroup(1, {"num_cpus": 1, "num_gpus": 1}, tiny_models["student"],
                         LearnerConfig(zero_stage=zero_stage, bf16="off"), LossConfig(),
                         name_prefix=f"nccl{zero_stage}")
    samplers = [ray.remote(StudentSampler).options(name=f"nccl{zero_stage}-sampler-{i}", num_cpus=0.5, num_gpus=1)
                .remote(i, tiny_models["student_b"], "hf", {}, {"max_new_tokens": 4}) for i in range(n_samplers)]
    ray.get(group.ready_refs() + [s.ready.remote() for s in samplers])
    want = ray.get(group.weights_ref())
    sync = WeightSync(group, samplers, mode="broadcast", bucket_mb=0.05, backend="nccl")
    for version in (1, 2):  # the second push reuses the group
        sync.push(version)
        sync.wait()
        assert ray.get([s.version.remote() for s in samplers]) == [version] * n_samplers
    for s in samplers:
        got = ray.get(s.__ray_call__.remote(
            lambda self: {k: v.cpu() for k, v in self.engine.model.state_dict().items()}))
        for k, v in want.items():
            assert torch.equal(got[k], v), k
    for s in samplers:
        ray.kill(s)
    group.shutdown()
