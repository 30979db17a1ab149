"""WARP, paper Algorithm 1 (Ramé et al., 2024, App. B.3), top to bottom.

    θ_init ← θ_sft
    for i in 1..I:
      for m in 1..M:                  independent runs (`reinforce`): own seed, own prompt order
        θ_m ← REINFORCE run of T steps from θ_init, with an EMA anchor
      θ_slerp^i ← θ_init + SLERP(θ_1 − θ_init, …, θ_M − θ_init)        per tensor (`merge`)
      θ_init ← (1 − η) θ_init + η θ_slerp^i                          LITI
    return θ_slerp^I

Every θ lives in the output folder (`layout.OutputDir`): θ_init is written before the runs and
read by each when it starts, so no copy of it is held while runs train; a finished run, merge
or LITI point is never recomputed, so an interrupted call resumes where it stopped.
How the M runs of an iteration are executed — one after another, side by side in processes,
as Ray tasks — is the caller's `Runner` (`warp_rlhf.runners`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open

from warp_rlhf.algorithm.merge import State, liti, merge_task_vectors
from warp_rlhf.algorithm.reinforce import RunSpec, TrainingError
from warp_rlhf.checkpoint import (
    UnreadableFile,
    load_tensors,
    read_json,
    remove_temporaries,
    save_tensors,
    verify_safetensors,
)
from warp_rlhf.config import WarpConfig
from warp_rlhf.layout import OutputDir, RunFolder

Runner = Callable[[list[RunSpec], Path], None]
"""Runs the unfinished REINFORCE runs of an iteration from θ_init (a safetensors file) and
returns once each has written its `done.json`."""


def iteration_specs(config: WarpConfig, out: OutputDir, iteration: int) -> list[RunSpec]:
    """The M runs of iteration i, each with an EMA anchor of rate μ (or, with `anchor: sft`, one fixed at its init)."""
    rate = config.ema_rate if config.anchor == "ema" else 0.0
    return [RunSpec(iteration, m, out.run(iteration, m), rate) for m in range(1, config.runs + 1)]


def train_warp(config: WarpConfig, sft: State, out: OutputDir, run_all: Runner) -> tuple[State, list[dict]]:
    """Algorithm 1 from θ_sft (`sft`). Returns θ_slerp^I (on CPU) and one summary per iteration."""
    if not out.init(1).exists():
        save_tensors(out.init(1), sft)  # θ_init ← θ_sft
    summaries = []
    for iteration in range(1, config.iterations + 1):
        remove_temporaries(out.iteration(iteration))
        specs = iteration_specs(config, out, iteration)
        if not out.slerp(iteration).exists():
            finished = [spec for spec in specs if spec.folder.done.exists()]
            _check_readable([out.init(iteration)], finished)  # before training the others
            run_all([spec for spec in specs if spec not in finished], out.init(iteration))
            _check_readable([], specs)
            merged = merge_task_vectors(
                load_tensors(out.init(iteration)),
                run_tensors([spec.folder for spec in specs]),
                config.runs,
                config.resolved_slerp_lambda,
                config.merge_method,
            )
            save_tensors(out.slerp(iteration), merged)
            del merged
        summaries.append({"iteration": iteration, "runs": [read_json(spec.folder.done) for spec in specs]})
        if iteration < config.iterations and not out.init(iteration + 1).exists():
            init, merged = load_tensors(out.init(iteration)), load_tensors(out.slerp(iteration))
            save_tensors(out.init(iteration + 1), liti(init, merged, config.liti_rate))
    return load_tensors(out.slerp(config.iterations)), summaries


def _check_readable(files: list[Path], finished: list[RunSpec]) -> None:
    """Fail in one line, with the way out, on a file of θ_init or of a finished run that is not whole."""
    for path in files:
        try:
            verify_safetensors(path)
        except UnreadableFile as error:
            raise TrainingError(f"{error}; delete it and run again with --resume to write it anew") from None
    for spec in finished:
        try:
            verify_safetensors(spec.folder.policy)
        except UnreadableFile as error:
            raise TrainingError(
                f"{spec.name}: {error}; delete {spec.folder.path} and run again with --resume to train this run again"
            ) from None


def run_tensors(folders: list[RunFolder]) -> Callable[[int, str], torch.Tensor]:
    """Run m's tensor `name`, read from its file on demand: one tensor of each run in memory."""
    handles = [safe_open(str(folder.policy), framework="pt") for folder in folders]
    return lambda m, name: handles[m].get_tensor(name)
