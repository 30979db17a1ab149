"""A REINFORCE run: T of `Trainer.step` from θ_init, with what makes it a run around them, as a
recipe composes a model's training step (torchtune): the checkpoint every `checkpoint_every`
steps and the resume from it, a line of metrics.jsonl per step, the progress bar, the step hook
(a tracker), with `log_completions` a table of completions every `logging_steps` steps, the
snapshots along the way, then policy.safetensors and done.json.

A run resumed from its checkpoint redoes the steps after it and ends bitwise where an
uninterrupted run does (`Trainer.step` draws from the step's own seed).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from tqdm.auto import tqdm

from warp_rlhf.algorithm.merge import copy_into
from warp_rlhf.algorithm.reinforce import Completions, RunSpec, Trainer, TrainingError, new_optimizer
from warp_rlhf.checkpoint import (
    UnreadableFile,
    atomic_dir,
    load_tensors,
    read_json,
    remove_temporaries,
    save_tensors,
    write_json,
    write_text,
)
from warp_rlhf.config import RUN_FIELDS, config_to_dict, resolve_paths

logger = logging.getLogger("warp_rlhf")


def train_run(
    trainer: Trainer,
    spec: RunSpec,
    init: Path | None,
    steps: int,
    snapshots: frozenset[int] = frozenset(),
    bar: int | None = None,
) -> None:
    """T steps from θ_init with a fresh optimiser; leaves policy.safetensors and done.json.

    θ_init is read from the safetensors file `init` when the run starts (None: the policy as it
    is now), so no copy of it stays in memory while the run trains. After each step k in
    `snapshots`, the policy is also saved (`RunFolder.snapshot`). `bar`: the terminal line of
    its progress bar, for runs side by side. A finished run (done.json) is left as it is.
    """
    files = spec.folder
    remove_temporaries(files.path)
    if files.done.exists():
        return
    files.path.mkdir(parents=True, exist_ok=True)
    optimizer, scheduler = new_optimizer(trainer.policy, trainer.config)
    start = _resume_or_start(trainer, spec, init, optimizer, scheduler, steps)
    _truncate_lines(files.metrics, start)
    for step, table in files.completion_tables().items():
        if step > start:  # redone: a table of the steps to come is written anew
            table.unlink()
    progress = tqdm(total=steps, initial=start, desc=spec.name, unit="step", dynamic_ncols=True, position=bar)
    with progress, open(files.metrics, "a") as log:
        for step in range(start, steps):
            metrics = trainer.step(spec, step, optimizer, scheduler).as_dict()
            log.write(json.dumps(metrics) + "\n")
            log.flush()
            if trainer.log_step is not None:
                trainer.log_step(spec, metrics)
            if trainer.completions is not None and _logging_step(trainer.completions.step, trainer, steps):
                _log_completions(trainer, spec, trainer.completions)
            progress.set_postfix(reward=f"{metrics['reward_mean']:.3f}", kl=f"{metrics['kl_to_anchor']:.3f}")
            progress.update()
            if step + 1 in snapshots:
                save_tensors(files.snapshot(step + 1), trainer.weights())
            if (step + 1) % trainer.config.checkpoint_every == 0 and step + 1 < steps:
                _save(trainer, files.checkpoint, step + 1, optimizer, scheduler)
    save_tensors(files.policy, trainer.weights())
    write_json(files.done, {"steps": steps, **_summary(files.metrics)})
    shutil.rmtree(files.checkpoint, ignore_errors=True)


def _logging_step(step: int, trainer: Trainer, steps: int) -> bool:
    """Whether step t's completions are logged: every `logging_steps` steps, and the run's last."""
    return step % trainer.config.logging_steps == 0 or step == steps


def _log_completions(trainer: Trainer, spec: RunSpec, completions: Completions) -> None:
    """The step's table to the run's completions/step_<n>.jsonl, and to the step hook's
    `completions` where it has one (a tracker: `stages.tracking.Tracking`)."""
    rows = completions.rows()
    write_text(spec.folder.completions(completions.step), "".join(json.dumps(row) + "\n" for row in rows))
    table = getattr(trainer.log_step, "completions", None)
    if table is not None:
        table(spec, completions.step, rows)


def _resume_or_start(trainer: Trainer, spec: RunSpec, init: Path | None, optimizer, scheduler, steps: int) -> int:
    """The step the run goes on from: its checkpoint's, restored, or 0 from θ_init (`Trainer.start`).
    A checkpoint made with other settings is set aside (the run restarts from θ_init)."""
    path = spec.folder.checkpoint
    try:
        if (path / "state.json").exists():
            _set_aside_if_changed(trainer, spec, path, steps)
        if not (path / "state.json").exists():
            trainer.start(spec, init)
            return 0
        return _restore(trainer, path, optimizer, scheduler)
    except UnreadableFile as error:
        remedy = (
            f"delete {path} and run again with --resume to restart this run from its init"
            if error.path.parent == path
            else "delete it and run again with --resume to write it anew"
        )
        raise TrainingError(f"{spec.name}: {error}; {remedy}") from None


def _run_fields(trainer: Trainer) -> dict:
    """The run's settings as a checkpoint records them, local paths absolute (`config_to_dict`)."""
    values = config_to_dict(trainer.config)
    return {name: values[name] for name in RUN_FIELDS}


def _set_aside_if_changed(trainer: Trainer, spec: RunSpec, path: Path, steps: int) -> None:
    saved = read_json(path / "state.json")
    made_with = resolve_paths(saved.get("fields", _run_fields(trainer))) | {"steps": max(saved["step"], steps)}
    current = _run_fields(trainer) | {"steps": steps}  # a checkpoint past the run's end is not resumed
    changed = [name for name, value in current.items() if made_with.get(name, value) != value]
    if changed:
        name, aside = changed[0], path.with_name(f"{path.name}.previous")
        logger.warning(
            "%s: its checkpoint was made with %s=%r, not %r: restarting the run from its init "
            "(the checkpoint is kept as %s)",
            spec.name, name, made_with[name], current[name], aside,
        )  # fmt: skip
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(path, aside)


def _save(trainer: Trainer, path: Path, step: int, optimizer, scheduler) -> None:
    state = optimizer.state_dict()
    moments = {f"{index}.{key}": value for index, entry in state["state"].items() for key, value in entry.items()}
    with atomic_dir(path) as tmp:
        save_tensors(tmp / "policy.safetensors", trainer.policy_state)
        save_tensors(tmp / "anchor.safetensors", trainer.anchor_state)
        save_tensors(tmp / "optimizer.safetensors", moments)
        write_json(
            tmp / "state.json",
            {
                "step": step,
                "param_groups": state["param_groups"],
                "scheduler": scheduler.state_dict(),
                "fields": _run_fields(trainer),
            },
        )


def _restore(trainer: Trainer, path: Path, optimizer, scheduler) -> int:
    """Policy (adapters included), anchor, optimiser and schedule from the checkpoint; its step."""
    copy_into(trainer.policy, load_tensors(path / "policy.safetensors", trainer.device))
    copy_into(trainer.anchor, load_tensors(path / "anchor.safetensors", trainer.device))
    saved = read_json(path / "state.json")
    moments: dict[int, dict] = {}
    for key, value in load_tensors(path / "optimizer.safetensors", trainer.device).items():
        index, name = key.split(".", 1)
        moments.setdefault(int(index), {})[name] = value.cpu() if name == "step" else value
    optimizer.load_state_dict({"state": moments, "param_groups": saved["param_groups"]})
    scheduler.load_state_dict(saved["scheduler"])
    return saved["step"]


def _truncate_lines(path: Path, keep: int) -> None:
    """Keep the first `keep` lines (steps after the checkpoint are redone)."""
    if path.exists():
        lines = path.read_text().splitlines(keepends=True)[:keep]
        path.write_text("".join(lines))


def _summary(log_path: Path) -> dict:
    rows = [json.loads(line) for line in log_path.read_text().splitlines()]
    if not rows:
        return {}
    tenth = max(1, len(rows) // 10)
    first, last = rows[:tenth], rows[-tenth:]

    def mean(part, key):
        return sum(r[key] for r in part) / len(part)

    return {
        "reward_first_10pct": mean(first, "reward_mean"),
        "reward_last_10pct": mean(last, "reward_mean"),
        "kl_to_anchor_last_10pct": mean(last, "kl_to_anchor"),
        "seconds_per_step": mean(rows, "seconds"),
    }
