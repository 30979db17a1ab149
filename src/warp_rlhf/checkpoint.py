"""Atomic writes: a reader sees the old file or folder, or the complete new one, never a half.

Files are written to a temporary name in the same folder and renamed over the target; folders
are filled under a temporary name and renamed into place. Everything is safetensors, JSON or
YAML: nothing is ever pickled.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from warp_rlhf.errors import WarpError


class UnreadableFile(WarpError):
    """A file that should hold tensors is missing, truncated or not safetensors; `path` names it."""

    def __init__(self, path: Path, why: str):
        super().__init__(f"{path} is unreadable ({why})")
        self.path, self.why = path, why


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def written_name(path: str | Path) -> Path:
    """The path a temporary one stands for (`.x.tmp-123` → `x`, in every part of the path)."""
    return Path(*(re.sub(r"^\.(.+)\.tmp-\d+$", r"\1", part) for part in Path(path).parts))


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces `path` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    try:
        yield tmp
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder; on success it takes the place of `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def remove_temporaries(folder: str | Path) -> None:
    """Delete what killed writers left in `folder` (not below it): their temporary names.

    Call it only where no other live process writes: each run folder has one writer at a time.
    """
    for leftover in Path(folder).glob(".*.tmp-*"):
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)
    for leftover in Path(folder).glob(".*.old-*"):
        shutil.rmtree(leftover, ignore_errors=True)


def write_text(path: str | Path, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Save a flat dict of tensors (no two sharing memory) as safetensors, atomically, without copies."""
    with atomic_file(path) as tmp:
        save_file({name: t.detach().contiguous() for name, t in tensors.items()}, str(tmp), metadata=metadata)


def verify_safetensors(path: str | Path) -> None:
    """Raise `UnreadableFile` unless `path` is a whole safetensors file: an 8-byte header length, a
    JSON header, and every tensor's bytes present (a truncated or overwritten file fails here,
    before long work; a changed byte inside the data cannot be seen without a checksum)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            if size < 8 or length <= 0 or 8 + length > size:
                raise UnreadableFile(path, f"truncated or not safetensors: {size} bytes")
            header = json.loads(handle.read(length))
    except FileNotFoundError:
        raise UnreadableFile(path, "missing") from None
    except (OSError, ValueError) as error:
        raise UnreadableFile(path, f"not safetensors: {type(error).__name__}") from None
    ends = [entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"]
    needed = 8 + length + max(ends, default=0)
    if size < needed:
        raise UnreadableFile(path, f"truncated: {size} of {needed} bytes")


def load_tensors(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; `UnreadableFile` naming it if it is not whole."""
    verify_safetensors(path)
    try:
        return load_file(str(path), device=str(device))
    except Exception as error:  # safetensors' own errors have no common base class
        raise UnreadableFile(Path(path), f"{type(error).__name__}: {str(error).splitlines()[0][:120]}") from None
