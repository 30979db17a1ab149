"""`backend: ray`: the M runs of an iteration as Ray tasks, on this machine or a cluster.

`RAY_ADDRESS` selects a running cluster; without it a local Ray instance is started. Each task
rebuilds its run from folders (`worker`); the output folder must be on storage every node sees.
A failed task is retried `ray_max_retries` times and resumes from its run's checkpoint; when the
driver stops, its tasks are cancelled.
"""

from __future__ import annotations

import os
from pathlib import Path

from warp_rlhf.algorithm.reinforce import RunSpec
from warp_rlhf.errors import WarpError
from warp_rlhf.runners.worker import RunJob, run_one


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


def run_on_ray(job: RunJob, specs: list[RunSpec], init_path: Path) -> None:
    """Run `specs` as parallel Ray tasks and wait for all of them."""
    ray, config = _ray(), job.config
    task = ray.remote(
        num_cpus=config.ray_num_cpus,
        num_gpus=config.ray_num_gpus,
        max_retries=config.ray_max_retries,  # a lost worker or node: the task resumes from its checkpoint
        retry_exceptions=False,  # an error of the run (a NaN, bad input) would only happen again
    )(run_one)
    threads = max(1, int(config.ray_num_cpus))
    pending = [task.remote(job, spec, str(init_path), threads) for spec in specs]
    try:
        ray.get(pending)
    except ray.exceptions.RayError as error:
        reason = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
        raise WarpError(f"a Ray run failed: {reason}") from None
    finally:  # a run failed, or the driver stops (Ctrl-C, SIGTERM): no task outlives it
        _, running = ray.wait(pending, num_returns=len(pending), timeout=0)
        for ref in running:
            ray.cancel(ref, force=True)
