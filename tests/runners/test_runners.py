"""The M runs side by side (backend: processes, backend: ray on a real local Ray instance, no
mocks) against backend: local, one run after the other: the same weights, bit for bit."""

import functools

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import share_reward_model
from warp_rlhf.algorithm.reinforce import RunSpec
from warp_rlhf.cli import main
from warp_rlhf.config import WarpConfig
from warp_rlhf.errors import ModelError
from warp_rlhf.layout import RunFolder
from warp_rlhf.runners import RunJob, side_by_side
from warp_rlhf.runners.processes import run_in_processes
from warp_rlhf.stages.pipeline import trainer_from_folders

FLAGS = ["--iterations", "2", "--runs", "2", "--steps", "3", "--batch_size", "4", "--checkpoint_every", "2",
         "--reward_epochs", "0.5", "--learning_rate", "1e-3", "--device", "cpu"]  # fmt: skip
COMPARED = ("iter_1/run_1/policy.safetensors", "iter_1/run_2/policy.safetensors", "final/model.safetensors")


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray", reason="Ray is installed by `make test` (the [ray] extra)")
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
    yield
    ray.shutdown()


def _train_local_then(tiny_args, tmp_path, threads: int, name: str, backend_flags: list[str]) -> None:
    """backend: local on `threads` threads into tmp_path/local, then the other backend into
    tmp_path/`name` on the same reward model and data, and compare their weights."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)  # as each side-by-side run
    try:
        local = [*tiny_args, "--output_dir", str(tmp_path / "local")]  # the last flag wins
        assert main(["train", *local, *FLAGS]) == 0
    finally:
        torch.set_num_threads(previous)
    share_reward_model(tmp_path / "local", tmp_path / name)  # compare WARP, not two reward-model trainings
    other = [*tiny_args, "--output_dir", str(tmp_path / name)]
    assert main(["train", *other, *FLAGS, *backend_flags]) == 0
    for file in COMPARED:
        a, b = load_file(tmp_path / "local" / file), load_file(tmp_path / name / file)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (file, key)
    assert (tmp_path / name / "iter_2" / "init.safetensors").exists()


def test_side_by_side_gives_each_run_an_equal_share_of_the_cores():
    assert side_by_side(2, cores=2) == (2, 1)
    assert side_by_side(4, cores=2) == (2, 1)  # two at a time, one core each
    assert side_by_side(2, cores=16) == (2, 8)
    assert side_by_side(3, cores=16) == (3, 5)
    assert side_by_side(1, cores=2) == (1, 2)


@pytest.mark.slow
def test_processes_and_local_backends_give_bitwise_identical_weights(tiny_args, tmp_path):
    _, threads = side_by_side(2)
    _train_local_then(tiny_args, tmp_path, threads, "processes", ["--backend", "processes"])


@pytest.mark.slow
def test_a_run_that_fails_in_its_process_raises_its_own_error(tmp_path):
    config = WarpConfig(device="cpu", runs=1, steps=1)
    factory = functools.partial(
        trainer_from_folders, config, str(tmp_path / "no-policy"), str(tmp_path / "no-reward"), ["a prompt"]
    )
    spec = RunSpec(1, 1, RunFolder(tmp_path / "iter_1" / "run_1"), config.ema_rate)
    with pytest.raises(ModelError, match="no-policy"):
        run_in_processes(RunJob(config, factory), [spec], tmp_path / "init.safetensors")
    assert not spec.folder.done.exists()


@pytest.mark.slow
def test_ray_and_local_backends_give_bitwise_identical_weights(tiny_args, tmp_path, local_ray):
    _train_local_then(tiny_args, tmp_path, 1, "ray", ["--backend", "ray", "--ray_num_cpus", "1"])
