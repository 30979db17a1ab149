"""The M runs of an iteration side by side (paper: they are independent until merged).

`backend: processes` runs them as local processes, the CPU cores split evenly between them
(`side_by_side`); `backend: ray` as Ray tasks, on this machine or a cluster. On 2 cores, two
runs side by side with one thread each made 18–24% more samples/s than one run after the other
on both threads (benchmarks/NOTES.md): a run's many small operations, sampling and Python work
leave a core idle that the other run then uses.

Each process or task rebuilds the policy, tokenizer and reward model from their folders, reads θ_init from
`iter_<i>/init.safetensors`, and runs `Trainer.run` into its own run folder. Results come back
through the output folder, not through Ray's object store: a run is finished when its
`done.json` exists (written after `policy.safetensors`), so the driver's merge never reads a
half-written result, a retried task resumes from its checkpoint, and a resumed iteration reuses
finished runs. The output folder must be on storage every Ray node sees.

`RAY_ADDRESS` selects a running cluster; without it a local Ray instance is started.
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

from warp_rlhf.config import WarpConfig
from warp_rlhf.errors import WarpError


@dataclass(frozen=True)
class WorkerJob:
    """Everything a Ray task needs to rebuild one REINFORCE run, as plain picklable values."""

    policy_path: str
    reward_path: str
    prompts: list[str]


def _ray():
    try:
        import ray
    except ImportError:
        raise WarpError("backend: ray needs Ray: pip install 'warp-rlhf[ray]'") from None
    if not ray.is_initialized():
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        address = os.environ.get("RAY_ADDRESS") or None
        ray.init(address=address, include_dashboard=False, log_to_driver=True, configure_logging=False)
    return ray


def _run_one(config: WarpConfig, job: WorkerJob, spec, init_path: str, threads: int, bar: int | None = None) -> str:
    """One REINFORCE run in a worker process on `threads` torch threads (its progress bar on line
    `bar`); returns its folder once done.json exists."""
    import torch

    from warp_rlhf.models import load_causal_lm, load_tokenizer
    from warp_rlhf.pipeline import reward_function
    from warp_rlhf.reward import RewardModel
    from warp_rlhf.warp import DONE, Trainer

    torch.set_num_threads(threads)
    device = config.torch_device
    policy = load_causal_lm(job.policy_path, trust_remote_code=config.trust_remote_code).to(device)
    tokenizer = load_tokenizer(job.policy_path, padding_side="left", trust_remote_code=config.trust_remote_code)
    reward = reward_function(RewardModel.from_pretrained(job.reward_path, device=device))
    trainer = Trainer(config, policy, tokenizer, reward, job.prompts)
    trainer.run(spec, Path(init_path), config.steps, bar=bar)
    if not (spec.folder / DONE).exists():
        raise RuntimeError(f"{spec.name} ended without {DONE}")
    return str(spec.folder)


def run_on_ray(config: WarpConfig, job: WorkerJob, specs: list, init_path: Path) -> None:
    """Run the unfinished `specs` as parallel Ray tasks and wait for all of them."""
    ray = _ray()
    task = ray.remote(
        num_cpus=config.ray_num_cpus,
        num_gpus=config.ray_num_gpus,
        max_retries=config.ray_max_retries,
        retry_exceptions=True,
    )(_run_one)
    threads = max(1, int(config.ray_num_cpus))
    pending = [task.remote(config, job, spec, str(init_path), threads) for spec in specs]
    try:
        ray.get(pending)
    except ray.exceptions.RayError as error:
        reason = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
        raise WarpError(f"a Ray run failed after {config.ray_max_retries} retries: {reason}") from None


def side_by_side(runs: int, cores: int | None = None) -> tuple[int, int]:
    """(processes, torch threads each) for `runs` runs on `cores` cores (this process's, by
    default): as many processes as runs, at most one per core, the cores split evenly."""
    cores = cores or len(os.sched_getaffinity(0))
    processes = max(1, min(runs, cores))
    return processes, max(1, cores // processes)


def run_in_processes(config: WarpConfig, job: WorkerJob, specs: list, init_path: Path) -> None:
    """Run the unfinished `specs` side by side in local processes (`side_by_side`) and wait for all.

    A run that fails raises its own error here once the others have stopped or finished.
    """
    processes, threads = side_by_side(len(specs))
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked torch threads
    with ProcessPoolExecutor(max_workers=processes, mp_context=context) as pool:
        pending = [
            pool.submit(_run_one, config, job, spec, str(init_path), threads, index) for index, spec in enumerate(specs)
        ]
        done, _ = wait(pending, return_when=FIRST_EXCEPTION)
        failed = [future for future in done if future.exception() is not None]
        if failed:
            for future in pending:
                future.cancel()
            error = failed[0].exception()
            if isinstance(error, BrokenProcessPool):
                raise WarpError("a run's process died before it finished (out of memory?)") from None
            raise error
