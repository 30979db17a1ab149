"""`backend: processes`: the M runs of an iteration side by side in local processes, the CPU
cores split evenly between them (paper: the runs are independent until merged).

On a CPU this is faster than one run after the other on all the cores: a run's many small
operations, sampling and Python work leave a core idle that the other run then uses
(benchmarks/NOTES.md). Each process rebuilds its run from folders (`worker`), so memory is M
times a run's.

Each run is one `spawn` process with a pipe back to the driver, which carries one message: None
when the run finished, or the run's own error. Nothing else is shared, so a driver that stops —
however it stops — leaves no semaphore behind for Python's resource tracker to warn about.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import multiprocessing
import os
import pickle
import signal
import threading
import traceback
from multiprocessing.connection import Connection, wait
from pathlib import Path

from tqdm.auto import tqdm

from warp_rlhf.algorithm.reinforce import RunSpec
from warp_rlhf.errors import WarpError
from warp_rlhf.runners.worker import RunJob, run_one


def side_by_side(runs: int, cores: int | None = None) -> tuple[int, int]:
    """(processes, torch threads each) for `runs` runs on `cores` cores (this process's, by
    default): as many processes as runs, at most one per core, the cores split evenly."""
    cores = cores or len(os.sched_getaffinity(0))
    processes = max(1, min(runs, cores))
    return processes, max(1, cores // processes)


def run_in_processes(job: RunJob, specs: list[RunSpec], init_path: Path) -> None:
    """Run `specs` side by side in local processes (`side_by_side`) and wait for all.

    A run that fails raises its own error here, after the others have stopped. When the driver
    stops (an error, Ctrl-C, SIGTERM), its run processes are terminated before it returns; each
    one's progress is in its checkpoint. A driver killed outright takes them with it (`_child`).
    """
    processes, threads = side_by_side(job.config.runs)  # by M, not by the runs left: the same threads on resume
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked torch threads
    waiting = list(enumerate(specs))
    running: dict[Connection, tuple[multiprocessing.process.BaseProcess, RunSpec]] = {}
    try:
        while waiting or running:
            while waiting and len(running) < processes:
                bar, spec = waiting.pop(0)
                reader, writer = context.Pipe(duplex=False)
                process = context.Process(target=_child, args=(writer, job, spec, str(init_path), threads, bar))
                process.start()
                writer.close()  # the child's end: EOF here when the child dies
                running[reader] = (process, spec)
            for reader in wait(list(running)):
                process, spec = running.pop(reader)
                _raise_failure(reader, process, spec)
    finally:  # a run failed, or the driver stops: the others stop too
        for process, _ in running.values():
            process.terminate()
        for reader, (process, _) in running.items():
            process.join()
            reader.close()


def _raise_failure(reader: Connection, process, spec: RunSpec) -> None:
    """Wait for a run's process to end; raise its error, or say how it died."""
    try:
        error = reader.recv()
    except EOFError:  # it ended without a word: killed
        error = _death(process, spec)
    finally:
        reader.close()
    process.join()
    if error is not None:
        raise error


def _death(process, spec: RunSpec) -> WarpError:
    process.join()
    code = process.exitcode
    if code is not None and code < 0:
        how = f"was killed by signal {-code}{' (out of memory?)' if code == -signal.SIGKILL else ''}"
    else:
        how = f"exited with code {code} before it finished"
    return WarpError(f"{spec.name}: its process {how}")


def _child(writer: Connection, job: RunJob, spec: RunSpec, init_path: str, threads: int, bar: int) -> None:
    """A run process: leave Ctrl-C to the driver (which stops the runs), die with the driver if it
    is killed (Linux's `PR_SET_PDEATHSIG`), run, and send back None or the run's error."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    tqdm.set_lock(threading.RLock())  # not its default multiprocessing lock: a terminated run would leak it
    try:
        run_one(job, spec, init_path, threads, bar)
        writer.send(None)
    except Exception as error:  # noqa: BLE001 (the driver raises it)
        writer.send(_portable(error))
    finally:
        writer.close()


def _portable(error: Exception) -> Exception:
    """`error` as the driver can unpickle it: a user's one-line error as it is; any other keeps its
    type where it pickles, with the run process's traceback as a note."""
    if not isinstance(error, WarpError):
        error.add_note("in the run's process:\n" + "".join(traceback.format_exception(error)).rstrip())
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:  # noqa: BLE001
        return WarpError(f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")


_PR_SET_PDEATHSIG = 1
