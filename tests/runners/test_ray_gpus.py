"""Ray places runs on GPUs: on a Ray instance with two logical GPUs (no CUDA needed), each run's
task gets its own CUDA_VISIBLE_DEVICES with `ray_num_gpus: 1`, two runs share one with `0.5`, and
each run would train on `cuda`, the GPU Ray gave it; without GPUs, on the CPU."""

import functools
import json
import os
import time
from pathlib import Path

import pytest

from tests.helpers import PROMPTS, good_fraction, make_tokenizer
from warp_rlhf.algorithm.merge import model_state
from warp_rlhf.algorithm.reinforce import RunSpec, Trainer
from warp_rlhf.checkpoint import save_tensors
from warp_rlhf.config import WarpConfig
from warp_rlhf.errors import WarpError
from warp_rlhf.layout import RunFolder
from warp_rlhf.runners import RunJob
from warp_rlhf.runners.ray import connect, run_on_ray, task_device
from warp_rlhf.stages.models import load_causal_lm


def test_a_ray_task_trains_on_the_gpus_ray_gave_it():
    assert task_device("auto", [1]) == "cuda"  # CUDA_VISIBLE_DEVICES=1: its first visible GPU
    assert task_device("auto", []) == "cpu"  # no GPU reserved: none taken
    assert task_device("cpu", [0]) == "cpu" and task_device("cuda", [0]) == "cuda"


@pytest.mark.parametrize(
    ("fields", "message"),
    [({"device": "cuda:1", "ray_num_gpus": 1}, "Ray gives each run its own GPU"),
     ({"device": "cuda", "ray_num_gpus": 0}, "needs ray_num_gpus > 0")],
)  # fmt: skip
def test_a_gpu_a_ray_task_cannot_own_is_refused_before_any_task(fields, message):
    pytest.importorskip("ray")
    with pytest.raises(WarpError, match=message):
        connect(WarpConfig(backend="ray", **fields))


def recording_trainer(config: WarpConfig, policy: str, record: str, runs: int, device: str | None = None) -> Trainer:
    """A run's trainer that first writes down where it would train (`device`, as the Ray task chose
    it, and the task's CUDA_VISIBLE_DEVICES), waits until all `runs` have, so that they hold their
    GPUs at once, then trains on the CPU: this machine has no CUDA."""
    import ray

    folder = Path(record)
    seen = {"device": device, "visible": os.environ.get("CUDA_VISIBLE_DEVICES"), "gpus": ray.get_gpu_ids()}
    (folder / f"{os.getpid()}.json").write_text(json.dumps(seen))
    deadline = time.monotonic() + 60
    while len(list(folder.glob("*.json"))) < runs and time.monotonic() < deadline:
        time.sleep(0.1)
    return Trainer(config, load_causal_lm(policy), make_tokenizer(), good_fraction, PROMPTS)


@pytest.fixture(scope="module")
def logical_gpus():
    ray = pytest.importorskip("ray", reason="Ray is installed by `make test` (the [ray] extra)")
    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.mark.slow
@pytest.mark.parametrize(("gpus", "shared"), [(1.0, False), (0.5, True)])
def test_ray_places_each_run_on_its_gpus(tiny_policy, tmp_path, logical_gpus, gpus, shared):
    config = WarpConfig(output_dir=str(tmp_path), runs=2, steps=1, batch_size=2, max_new_tokens=3, backend="ray",
                        ray_num_gpus=gpus, ray_max_retries=0)  # fmt: skip
    record = tmp_path / "record"
    record.mkdir()
    factory = functools.partial(recording_trainer, config, str(tiny_policy), str(record), config.runs)
    specs = [RunSpec(1, m, RunFolder(tmp_path / f"run_{m}"), config.ema_rate) for m in (1, 2)]
    init = tmp_path / "init.safetensors"
    save_tensors(init, model_state(load_causal_lm(str(tiny_policy))))
    run_on_ray(RunJob(config, factory), specs, init)
    seen = [json.loads(path.read_text()) for path in sorted(record.glob("*.json"))]
    assert [run["device"] for run in seen] == ["cuda", "cuda"]
    visible = sorted(run["visible"] for run in seen)
    assert visible == (["0", "0"] if shared else ["0", "1"])
    assert all(run["visible"] == ",".join(map(str, run["gpus"])) for run in seen)
    assert all(spec.folder.done.exists() for spec in specs)
