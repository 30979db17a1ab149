"""A REINFORCE run in a process of its own: what `processes` and `ray` execute.

The process rebuilds its run from folders through `RunJob.make_trainer`, a picklable factory
that the caller supplies (`warp_rlhf.stages.pipeline.trainer_from_folders`), so this package
knows nothing of how models are loaded. Results come back through the output folder, not
through the process pool or Ray's object store: a run is finished when its `done.json` exists
(written after `policy.safetensors`), so the driver's merge never reads a half-written result,
a retried run resumes from its checkpoint, and a resumed iteration reuses finished runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from warp_rlhf.algorithm.reinforce import RunSpec, Trainer
from warp_rlhf.algorithm.run_loop import train_run
from warp_rlhf.config import WarpConfig


@dataclass(frozen=True)
class RunJob:
    """Everything a process needs to rebuild a run, as picklable values."""

    config: WarpConfig
    make_trainer: Callable[..., Trainer]  # a module-level function or a partial of one; device= where it trains


def run_one(
    job: RunJob, spec: RunSpec, init_path: str, threads: int, bar: int | None = None, device: str | None = None
) -> str:
    """One REINFORCE run on `threads` torch threads (its progress bar on line `bar`) and on `device`
    (None: the config's `torch_device`); returns its folder once done.json exists. Process-wide
    settings are made here, at the worker's start."""
    import torch

    from warp_rlhf.cpu import keep_freed_memory

    torch.set_num_threads(threads)
    keep_freed_memory()
    trainer = job.make_trainer() if device is None else job.make_trainer(device=device)
    try:
        train_run(trainer, spec, Path(init_path), job.config.steps, bar=bar)
    finally:
        close = getattr(trainer.log_step, "close", None)  # a tracker's runs end with the process's work
        if close is not None:
            close()
    if not spec.folder.done.exists():
        raise RuntimeError(f"{spec.name} ended without {spec.folder.done.name}")
    return str(spec.folder.path)
