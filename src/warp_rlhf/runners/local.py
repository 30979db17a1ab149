"""`backend: local`: the M runs of an iteration one after another, in this process."""

from __future__ import annotations

from pathlib import Path

from warp_rlhf.algorithm.reinforce import RunSpec, Trainer
from warp_rlhf.algorithm.run_loop import train_run


def run_locally(trainer: Trainer, specs: list[RunSpec], init_path: Path) -> None:
    """Each run from θ_init on the trainer's one policy and anchor (weights are restored per run)."""
    for spec in specs:
        train_run(trainer, spec, init_path, trainer.config.steps)
