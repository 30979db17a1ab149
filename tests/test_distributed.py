"""backend: ray against backend: local on a real local Ray instance (no mocks)."""

import shutil

import pytest
import torch
from safetensors.torch import load_file

from warp_rlhf.cli import main

ray = pytest.importorskip("ray", reason="Ray is installed by `make test` (the [ray] extra)")

FLAGS = ["--iterations", "2", "--runs", "2", "--steps", "3", "--batch_size", "4", "--checkpoint_every", "2",
         "--reward_epochs", "0.5", "--learning_rate", "1e-3", "--device", "cpu"]  # fmt: skip


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
    yield
    ray.shutdown()


def test_ray_and_local_backends_give_bitwise_identical_weights(tiny_args, tmp_path, local_ray):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each Ray task with ray_num_cpus = 1
    try:
        local = [*tiny_args, "--output_dir", str(tmp_path / "local")]  # the last flag wins
        assert main(["train", *local, *FLAGS]) == 0
    finally:
        torch.set_num_threads(threads)
    for shared in ("reward_model", "data"):  # compare WARP, not two reward-model trainings
        shutil.copytree(tmp_path / "local" / shared, tmp_path / "ray" / shared)
    remote = [*tiny_args, "--output_dir", str(tmp_path / "ray")]
    assert main(["train", *remote, *FLAGS, "--backend", "ray", "--ray_num_cpus", "1"]) == 0
    for name in ("iter_1/run_1/policy.safetensors", "iter_1/run_2/policy.safetensors", "final/model.safetensors"):
        a, b = load_file(tmp_path / "local" / name), load_file(tmp_path / "ray" / name)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)
    assert (tmp_path / "ray" / "iter_2" / "init.safetensors").exists()
