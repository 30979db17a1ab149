"""Owning an output folder: one process at a time, what a config change means, and what is kept.

- **A lock** (`OutputLock`): `output_dir/.warp-rlhf.lock`, held with `flock` for the life of a
  command. A second process gets one line naming the holder; a lock left by a killed process is
  free again (the kernel drops a dead process's locks).
- **Config changes on resume** (`check_compatible`): a field that changes the result of a
  *finished* piece of work (the splits, the reward model, a finished WARP run or merge, the
  baseline, an evaluated policy) is refused; a field that only affects what is still to come, or
  where things run (`device`, `backend`), or where the folder lives (`output_dir`), is taken. An
  unfinished run's checkpoint made with other settings restarts from its init (`reinforce`).
- **Finished work is never deleted**: `--overwrite` removes warp-rlhf's own entries only, a
  folder holding other files is not taken, and a failed command removes a folder it created only
  while no finished work is in it (`finished_work`).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from warp_rlhf.checkpoint import read_json
from warp_rlhf.config import RUN_FIELDS, WarpConfig, config_to_dict, read_yaml
from warp_rlhf.errors import ConfigError
from warp_rlhf.layout import LOCK_FILE, OutputDir

SPLIT_FIELDS = {
    "policy", "dataset", "dataset_split", "text_column", "label_column", "prompt_column", "eval_dataset",
    "eval_split", "reward_dataset", "seed", "prompt_min_tokens", "prompt_max_tokens", "reward_train_pairs",
    "reward_eval_pairs", "rl_prompts", "eval_prompts", "max_new_tokens",
}  # fmt: skip
"""What `data/splits.json` depends on."""
REWARD_FIELDS = SPLIT_FIELDS | {"reward_model", "reward_epochs", "reward_batch_size", "reward_learning_rate"}
OPTIMISED_FIELDS = REWARD_FIELDS | {"reward_funcs", "reward_weights"}
"""What r(x, y), the reward a policy was trained on, depends on."""
WARP_RUN_FIELDS = (
    OPTIMISED_FIELDS | set(RUN_FIELDS) | {"steps", "runs", "slerp_lambda", "liti_rate", "merge_method"}
) - {"baseline_anchor"}
"""A finished WARP run of iteration i depends on its settings and on θ_init, i.e. on the merges before it."""
BASELINE_FIELDS = (OPTIMISED_FIELDS | set(RUN_FIELDS) | {"iterations", "runs", "steps", "trajectory_points"}) - {
    "anchor"
}
EVALUATION_FIELDS = OPTIMISED_FIELDS | {"temperature", "judge"}


def finished_work(out: Path) -> dict[str, set[str]]:
    """The finished pieces of work in `out`, each with the fields its result depends on."""
    paths, found = OutputDir(out), {}
    if paths.splits.exists():
        found["the data splits (data/splits.json)"] = SPLIT_FIELDS
    if paths.reward_metrics.exists():
        found["the reward model (reward_model/)"] = REWARD_FIELDS
    finished = [run.done for run in paths.runs() if run.done.exists()] + paths.merges()
    if finished:
        found[f"WARP's finished runs and merges ({finished[0].parent.relative_to(out)}, …)"] = WARP_RUN_FIELDS
    if (paths.final / "config.json").exists():
        found["the WARP policy (final/)"] = WARP_RUN_FIELDS | {"iterations"}
    if paths.baseline.done.exists() or paths.baseline.snapshots():
        found["the REINFORCE baseline (reinforce/)"] = BASELINE_FIELDS
    if paths.evaluated_all():
        found["evaluated policies (eval/policies/)"] = EVALUATION_FIELDS
    return found


def has_progress(out: Path) -> bool:
    """Whether `out` holds anything worth keeping: finished work or a run's checkpoint, here or in
    one of its sweep's folders."""
    paths = OutputDir(out)
    return (
        any(not piece.startswith("the data splits") for piece in finished_work(out))  # splits are quick to cut again
        or any(run.checkpoint.exists() for run in [*paths.runs(), paths.baseline])
        or any(has_progress(value) for value in paths.sweep_values())
    )


def check_compatible(config: WarpConfig, out: Path) -> None:
    """Refuse a config whose changes would not match the finished work in `out` (module docstring)."""
    saved = OutputDir(out).config
    if not saved.exists():
        return
    previous, current = read_yaml(saved), config_to_dict(config)
    changed = [name for name, value in current.items() if name in previous and previous[name] != value]
    for piece, fields in finished_work(out).items():
        clash = [name for name in changed if name in fields]
        if clash:
            name = clash[0]
            raise ConfigError(
                f"{name}: {previous[name]!r} → {current[name]!r} would not match {piece} in {out}, made with "
                f"{name}={previous[name]!r}; keep the value, or use another output_dir (or --overwrite)"
            )


OWN = re.compile(r"^(config\.yaml|data|reward_model|iter_\d+|final|reinforce|eval|report\.md|timings\.json|sweep"
                 r"|tensorboard|wandb|\.warp-rlhf\.lock|\..*\.(tmp|old)-\d+)$")  # fmt: skip
"""The names warp-rlhf writes at the top of an output folder (`layout.OutputDir`); anything else is
the user's."""


def foreign_entries(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if not OWN.match(p.name)) if out.is_dir() else []


def refuse_foreign(out: Path) -> None:
    """A folder holding files but no warp-rlhf run is another program's: never write into it."""
    foreign = foreign_entries(out)
    if foreign and not OutputDir(out).config.exists():
        raise ConfigError(
            f"output_dir {out} holds files that are not a warp-rlhf run ({', '.join(foreign[:3])}"
            f"{', …' if len(foreign) > 3 else ''}): choose a new or empty folder"
        )


def claim(config: WarpConfig, out: Path, *, overwrite: bool) -> None:
    """Make `out` this config's folder: refuse another program's folder, apply `--overwrite` to
    warp-rlhf's own entries only, check the config against the finished work, save the config."""
    refuse_foreign(out)
    if overwrite:
        for entry in sorted(out.iterdir()) if out.is_dir() else []:
            if OWN.match(entry.name) and entry.name != LOCK_FILE:
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    else:
        check_compatible(config, out)


class OutputLock:
    """`flock` on `output_dir/.warp-rlhf.lock` for the life of a command (module docstring).

    Re-entrant within a process, so a sweep's stages can claim the folder their command holds.
    """

    _held: dict[Path, tuple[int, int]] = {}  # resolved lock path → (file descriptor, depth)

    def __init__(self, out: Path):
        self.path = (Path(out) / LOCK_FILE).resolve()

    def __enter__(self) -> OutputLock:
        if self.path in self._held:
            fd, depth = self._held[self.path]
            self._held[self.path] = (fd, depth + 1)
            return self
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise ConfigError(f"output_dir {self.path.parent} cannot be written: {error.strerror or error}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise ConfigError(
                f"output_dir {self.path.parent} is in use by {holder}: wait for it to finish, or stop it"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.ctime()}).encode())
        self._held[self.path] = (fd, 1)
        return self

    def __exit__(self, *_) -> None:
        fd, depth = self._held[self.path]
        if depth > 1:
            self._held[self.path] = (fd, depth - 1)
            return
        del self._held[self.path]
        fcntl.flock(fd, fcntl.LOCK_UN)  # the file stays: unlinking it could let two holders in
        os.close(fd)


def _read_holder(fd: int) -> str:
    try:
        holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"process {holder['pid']} on {holder['host']} (since {holder['since']})"
    except (ValueError, KeyError, OSError):
        return "another process"


@contextmanager
def owned(out: Path) -> Iterator[None]:
    """The lock on `out` for a command; a folder this command created and that holds no progress
    when the command fails is removed (bad input leaves nothing behind), any other is kept."""
    created = not out.exists()
    refuse_foreign(out)
    with OutputLock(out):
        try:
            yield
        except BaseException:  # cleaned while the lock is held: no other process is in the folder
            if created and out.is_dir() and not has_progress(out) and not foreign_entries(out):
                shutil.rmtree(out, ignore_errors=True)
            raise


def progress_summary(out: Path) -> str:
    """What `out` holds, in a few words: which stages finished, where an unfinished run stands."""
    paths, parts = OutputDir(out), []
    if not out.is_dir():
        return "nothing yet"
    if paths.reward_metrics.exists():
        parts.append("reward model")
    done = [run for run in paths.runs() if run.done.exists()]
    if done:
        parts.append(f"{len(done)} finished WARP run{'s' * (len(done) > 1)}")
    for run in [*paths.runs(), paths.baseline]:
        if run.checkpoint_state.exists():
            parts.append(f"{run.path.relative_to(out)} checkpointed at step {read_json(run.checkpoint_state)['step']}")
    if (paths.final / "config.json").exists():
        parts.append("the WARP policy (final/)")
    if paths.baseline.done.exists():
        parts.append("the REINFORCE baseline")
    evaluated = paths.evaluated_all()
    if evaluated:
        parts.append(f"{len(evaluated)} evaluated polic{'ies' if len(evaluated) > 1 else 'y'}")
    return ", ".join(parts) if parts else "nothing finished yet"
