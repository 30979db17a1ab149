"""The REINFORCE baseline of the paper's comparisons: one run from θ_sft whose anchor stays at
θ_sft (μ = 0; or, with `baseline_anchor: ema`, an EMA anchor: one WARP run without merging), for
the I·M·T steps that WARP's runs take together (equal compute).

Evenly spaced policies along the run (`trajectory_points`) are kept, so its reward–KL
trajectory can be drawn and compared with WARP's LITI front.
"""

from __future__ import annotations

from pathlib import Path

from warp_rlhf.algorithm.reinforce import RunSpec, Trainer
from warp_rlhf.algorithm.run_loop import train_run
from warp_rlhf.config import WarpConfig
from warp_rlhf.layout import RunFolder


def total_steps(config: WarpConfig) -> int:
    """I·M·T: the steps of all of WARP's runs together."""
    return config.iterations * config.runs * config.steps


def trajectory_steps(config: WarpConfig) -> list[int]:
    """The baseline's evaluated steps: `trajectory_points` evenly spaced, ending at I·M·T."""
    total, points = total_steps(config), config.trajectory_points
    return sorted({max(1, round(total * k / points)) for k in range(1, points + 1)})


def trajectory_files(config: WarpConfig, folder: RunFolder) -> list[tuple[int, Path]]:
    """(step, weights file) along the trajectory; the last is the end of training."""
    steps = trajectory_steps(config)
    return [(k, folder.snapshot(k)) for k in steps[:-1]] + [(steps[-1], folder.policy)]


def train_reinforce(trainer: Trainer, folder: RunFolder) -> list[tuple[int, Path]]:
    """Run the baseline from the trainer's policy as it is (θ_sft); returns `trajectory_files`."""
    config = trainer.config
    steps = trajectory_steps(config)
    rate = config.ema_rate if config.baseline_anchor == "ema" else 0.0
    train_run(trainer, RunSpec(0, 1, folder, anchor_rate=rate), None, total_steps(config), frozenset(steps[:-1]))
    return trajectory_files(config, folder)
