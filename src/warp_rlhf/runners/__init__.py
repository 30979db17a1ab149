"""How the M independent runs of a WARP iteration are executed: `local` (one after another),
`processes` (side by side, the CPU cores split between them) or `ray` (Ray tasks)."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

from warp_rlhf.algorithm.reinforce import RunSpec, Trainer
from warp_rlhf.algorithm.warp import Runner
from warp_rlhf.config import WarpConfig
from warp_rlhf.runners.local import run_locally
from warp_rlhf.runners.processes import run_in_processes, side_by_side
from warp_rlhf.runners.worker import RunJob


def make_runner(backend: str, job: RunJob, local_trainer: Trainer | None = None) -> Runner:
    """The `Runner` of `backend`; `local` runs on `local_trainer` (built from the job if None)."""
    if backend == "processes":
        return functools.partial(run_in_processes, job)
    if backend == "ray":
        from warp_rlhf.runners.ray import run_on_ray

        return functools.partial(run_on_ray, job)
    trainer = local_trainer or job.make_trainer()

    def run(specs: list[RunSpec], init_path: Path) -> None:
        run_locally(trainer, specs, init_path)

    return run


def check_backend(config: WarpConfig) -> None:
    """Fail in one line, before any work, where `backend` cannot run the runs (Ray: no cluster
    at RAY_ADDRESS, or no node with the resources one run asks for)."""
    if config.backend == "ray":
        from warp_rlhf.runners.ray import connect

        connect(config)


def release() -> None:
    """Stop what a backend started for this process (a local Ray instance), at a command's end."""
    if "warp_rlhf.runners.ray" in sys.modules:
        sys.modules["warp_rlhf.runners.ray"].shutdown_started()


__all__ = ["RunJob", "check_backend", "make_runner", "release", "side_by_side"]
