"""Owning an output folder: one process at a time, only what it wrote, what a config change means.

- **A lock** (`OutputLock`): `output_dir/.warp-rlhf.lock`, held with `flock` for the life of a
  command. A second process gets one line naming the holder; a lock left by a killed process is
  free again (the kernel drops a dead process's locks).
- **Ownership by record, not by name** (`claim`): `output_dir/.warp-rlhf.json` lists the top-level
  entries warp-rlhf created, recorded before it writes them. Only those are ever deleted
  (`--overwrite`) or written over; a folder that holds files but no record is another program's and
  is not taken; an entry the tool would write but did not create (a user's `data/` or `report.md`)
  is refused, and so is an `output_dir` that holds one of the run's inputs.
- **Config changes on resume** (`check_compatible`): a field that changes the result of a
  *finished* piece of work (the splits, the reward model, a finished WARP run or merge, the
  baseline, an evaluated policy) is refused; which pieces a field changes is declared on the field
  itself (`affects`, see `config.AFFECTS`). Fields that only affect what is still to come, or where
  things run, are taken. An unfinished run's checkpoint made with other settings restarts from its
  init (`reinforce`).
- **Finished work is never deleted**: a failed command removes a folder it created only while no
  finished work is in it (`finished_work`).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import socket
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from warp_rlhf.checkpoint import read_json, remove_temporaries, write_json
from warp_rlhf.config import EMBEDDED, WarpConfig, config_to_dict, fields_affecting, read_yaml, resolve_paths
from warp_rlhf.errors import ConfigError
from warp_rlhf.layout import LOCK_FILE, MANIFEST, OutputDir


def _depends(*pieces: str) -> frozenset[str]:
    return frozenset(fields_affecting(*pieces))


_TRAINED = ("splits", "reward_model", "rewards", "steps")
SPLIT_FIELDS = _depends("splits")
"""What `data/splits.json` depends on."""
REWARD_FIELDS = _depends("splits", "reward_model")
"""What the reward model depends on."""
WARP_RUN_FIELDS = _depends(*_TRAINED, "warp_steps", "warp")
"""A finished WARP run of iteration i depends on its settings and on θ_init, i.e. on the merges before it."""
FINAL_FIELDS = _depends(*_TRAINED, "warp_steps", "warp", "final")
BASELINE_FIELDS = _depends(*_TRAINED, "baseline_steps", "baseline")
EVALUATION_FIELDS = _depends("splits", "reward_model", "rewards", "evaluation")


def finished_work(out: Path) -> dict[str, frozenset[str]]:
    """The finished pieces of work in `out`, each with the fields its result depends on."""
    paths, found = OutputDir(out), {}
    if paths.splits.exists():
        found["the data splits (data/splits.json)"] = SPLIT_FIELDS
    if paths.reward_metrics.exists():
        found["the reward model (reward_model/)"] = REWARD_FIELDS
    if paths.finished_reward_members():
        found["the reward model's finished members (reward_members/)"] = REWARD_FIELDS
    finished = [run.done for run in paths.runs() if run.done.exists()] + paths.merges()
    if finished:
        found[f"WARP's finished runs and merges ({finished[0].parent.relative_to(out)}, …)"] = WARP_RUN_FIELDS
    if (paths.final / "config.json").exists():
        found["the WARP policy (final/)"] = FINAL_FIELDS
    if paths.baseline.done.exists() or paths.baseline.snapshots():
        found["the REINFORCE baseline (reinforce/)"] = BASELINE_FIELDS
    for rloo in sorted(Path(out).glob("rloo_*/metrics.json")):
        found[f"TRL RLOO's trajectory ({rloo.parent.name}/)"] = BASELINE_FIELDS
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
    previous, current = resolve_paths(read_yaml(saved)), config_to_dict(config)  # both with absolute paths
    changed = [name for name, value in current.items() if name in previous and previous[name] != value]
    for piece, fields in finished_work(out).items():
        clash = [name for name in changed if name in fields]
        if clash:
            name = clash[0]
            raise ConfigError(
                f"{name}: {previous[name]!r} → {current[name]!r} would not match {piece} in {out}, made with "
                f"{name}={previous[name]!r}; keep the value to continue, or start afresh in another output_dir"
            )


# ---- ownership -------------------------------------------------------------------------------
_TEMPORARY = re.compile(r"^\.(.+)\.(tmp|old)-\d+$")
"""A name `checkpoint.atomic_file` / `atomic_dir` writes before its rename: `.<name>.tmp-<pid>`."""


def owned_entries(out: Path) -> set[str] | None:
    """The top-level entries warp-rlhf recorded as its own in `out`; None where it never wrote there."""
    manifest = OutputDir(out).manifest
    if not manifest.exists():
        return None
    try:
        return set(read_json(manifest)["entries"])
    except (OSError, ValueError, KeyError, TypeError):
        raise ConfigError(f"{manifest} is unreadable: it records which entries warp-rlhf wrote") from None


def _ours(name: str, owned: set[str]) -> bool:
    temporary = _TEMPORARY.match(name)
    base = temporary.group(1) if temporary else name
    return base in owned or base in {LOCK_FILE, MANIFEST}


def foreign_entries(out: Path) -> list[str]:
    """The top-level entries of `out` that warp-rlhf did not write: the user's, never touched."""
    if not out.is_dir():
        return []
    owned = owned_entries(out) or set()
    return sorted(p.name for p in out.iterdir() if not _ours(p.name, owned))


def refuse_foreign(out: Path) -> None:
    """A folder holding files but no record of warp-rlhf's is another program's: never write into it."""
    foreign = foreign_entries(out)
    if foreign and owned_entries(out) is None:
        raise ConfigError(
            f"output_dir {out} holds files that are not a warp-rlhf run ({', '.join(foreign[:3])}"
            f"{', …' if len(foreign) > 3 else ''}): choose a new or empty folder"
        )


def input_paths(config: WarpConfig) -> list[tuple[str, Path]]:
    """(field, path) of every input of `config` that is a local file or folder."""
    found = []
    for name in ("policy", "reward_model", "dataset", "eval_dataset", "reward_dataset"):
        value = getattr(config, name)
        if value not in {None, EMBEDDED} and Path(value).exists():
            found.append((name, Path(value)))
    for name, specs in (("reward_funcs", config.reward_funcs), ("judge", [config.judge])):
        for spec in specs:
            source = spec.split("[")[0].rsplit(":", 1)[0] if ":" in spec else spec.split("[")[0]
            if source and Path(source).exists():
                found.append((name, Path(source)))
    return found


def refuse_inputs_inside(out: Path, inputs: Iterable[tuple[str, Path]], *, overwrite: bool) -> None:
    """An input inside `out` could be written over or deleted: refuse it, unless it lies in an entry
    warp-rlhf wrote (a policy of an earlier run) and nothing is to be deleted."""
    root, owned = out.resolve(), owned_entries(out) or set()
    for what, path in inputs:
        inside = Path(path).resolve()
        if inside != root and root not in inside.parents:
            continue
        top = inside.relative_to(root).parts[:1]
        if overwrite or not top or top[0] not in owned:
            raise ConfigError(
                f"output_dir {out} holds {what} {path}: warp-rlhf could write over or delete it; "
                "choose an output_dir that holds none of the inputs"
            )


def remove_stale_temporaries(out: Path) -> None:
    """Delete the temporaries that killed writers left in warp-rlhf's entries of `out`, at any depth
    (a file is written to `.<name>.tmp-<pid>`, then renamed; a SIGKILL between the two leaves it).
    Call it only while holding the lock, before any run process starts: then no live writer owns one."""
    owned = owned_entries(out) or set()
    for entry in sorted(out.iterdir()):
        if _TEMPORARY.match(entry.name) and _ours(entry.name, owned):
            _remove(entry)
        elif entry.name in owned and entry.is_dir() and not entry.is_symlink():
            for parent, folders, _ in os.walk(entry):
                remove_temporaries(parent)
                folders[:] = [name for name in folders if not _TEMPORARY.match(name)]


def _remove(path: Path) -> None:
    shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink(missing_ok=True)


def own_entry(out: Path, name: str) -> Path:
    """Record top-level entry `name` of `out` as warp-rlhf's before writing it (`claim` records a
    command's entries; this is for one written before the command claims the folder)."""
    refuse_foreign(out)
    owned = owned_entries(out) or set()
    if name not in owned:
        if (out / name).exists() or (out / name).is_symlink():
            raise ConfigError(f"output_dir {out} holds {name}, which warp-rlhf did not write and would write over")
        out.mkdir(parents=True, exist_ok=True)
        write_json(OutputDir(out).manifest, {"entries": sorted(owned | {name})})
    return out / name


def claim(config: WarpConfig, out: Path, *, overwrite: bool, inputs: Iterable[tuple[str, Path]] = ()) -> None:
    """Make `out` this config's folder (module docstring): refuse another program's folder and one
    that holds an input, apply `--overwrite` to warp-rlhf's recorded entries only, check the config
    against the finished work, and record the entries the command may write before it writes them."""
    refuse_foreign(out)
    refuse_inputs_inside(out, [*input_paths(config), *inputs], overwrite=overwrite)
    owned = owned_entries(out) or set()
    if overwrite:
        for entry in sorted(out.iterdir()) if out.is_dir() else []:
            if _ours(entry.name, owned) and entry.name not in {LOCK_FILE, MANIFEST}:
                _remove(entry)
        owned = set()
    else:
        check_compatible(config, out)
    wanted = OutputDir(out).entries(config.iterations)
    taken = [name for name in wanted if name not in owned and ((out / name).exists() or (out / name).is_symlink())]
    if taken:
        raise ConfigError(
            f"output_dir {out} holds {taken[0]}, which warp-rlhf did not write and would write over: "
            "move it, or choose another output_dir"
        )
    write_json(OutputDir(out).manifest, {"entries": sorted(owned | set(wanted))})
    remove_stale_temporaries(out)


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
        finally:
            settle(out)


def settle(out: Path) -> None:
    """Keep in the record only the entries that exist: a name `claim` recorded for this command but
    that it did not write is not warp-rlhf's (a file the user puts there later stays the user's)."""
    owned = owned_entries(out) if out.is_dir() else None
    if owned is not None:
        kept = {name for name in owned if (out / name).exists() or (out / name).is_symlink()}
        if kept != owned:
            write_json(OutputDir(out).manifest, {"entries": sorted(kept)})


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
