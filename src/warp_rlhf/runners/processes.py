"""`backend: processes`: the M runs of an iteration side by side in local processes, the CPU
cores split evenly between them (paper: the runs are independent until merged).

On a CPU this is faster than one run after the other on all the cores: a run's many small
operations, sampling and Python work leave a core idle that the other run then uses
(benchmarks/NOTES.md). Each process rebuilds its run from folders (`worker`), so memory is M
times a run's.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import multiprocessing
import os
import signal
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

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

    A run that fails raises its own error here once the others have stopped. When the driver stops
    (an error, Ctrl-C, SIGTERM), its run processes are terminated before it returns; each one's
    progress is in its checkpoint. A driver killed outright takes them with it (`_worker_start`).
    """
    processes, threads = side_by_side(job.config.runs)  # by M, not by the runs left: the same threads on resume
    processes = min(processes, len(specs))
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked torch threads
    pool = ProcessPoolExecutor(max_workers=processes, mp_context=context, initializer=_worker_start)
    try:
        pending = [pool.submit(run_one, job, spec, str(init_path), threads, index) for index, spec in enumerate(specs)]
        done, _ = wait(pending, return_when=FIRST_EXCEPTION)
        failed = [future for future in done if future.exception() is not None]
        if failed:
            error = failed[0].exception()
            if isinstance(error, BrokenProcessPool):
                raise WarpError("a run's process died before it finished (out of memory?)") from None
            raise error
    except BaseException:
        _stop(pool)  # a run failed, or the driver stops: the others stop too
        raise
    pool.shutdown(wait=True)


def _stop(pool: ProcessPoolExecutor) -> None:
    """Terminate the pool's processes that are still running, then shut it down.

    `ProcessPoolExecutor.shutdown` waits for running work to finish (Python 3.14 adds
    `terminate_workers`); until then its process table is the only handle on them.
    """
    for process in list(getattr(pool, "_processes", {}).values()):
        if process.is_alive():
            process.terminate()
    pool.shutdown(wait=True, cancel_futures=True)


def _worker_start() -> None:
    """In each run process: leave Ctrl-C to the driver (which stops the runs), and on Linux die
    with the driver if it is killed (`PR_SET_PDEATHSIG`), so no run outlives it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


_PR_SET_PDEATHSIG = 1
