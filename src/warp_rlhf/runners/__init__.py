"""How the M independent runs of a WARP iteration are executed: `local` (one after another),
`processes` (side by side, the CPU cores split between them) or `ray` (Ray tasks)."""

from __future__ import annotations

import functools
from pathlib import Path

from warp_rlhf.algorithm.reinforce import RunSpec, Trainer
from warp_rlhf.algorithm.warp import Runner
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


__all__ = ["RunJob", "make_runner", "side_by_side"]
