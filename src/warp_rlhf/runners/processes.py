"""`backend: processes`: the M runs of an iteration side by side in local processes, the CPU
cores split evenly between them (paper: the runs are independent until merged).

On a CPU this is faster than one run after the other on all the cores: a run's many small
operations, sampling and Python work leave a core idle that the other run then uses
(benchmarks/NOTES.md). Each process rebuilds its run from folders (`worker`), so memory is M
times a run's.
"""

from __future__ import annotations

import multiprocessing
import os
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

    A run that fails raises its own error here once the others have stopped or finished.
    """
    processes, threads = side_by_side(len(specs))
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked torch threads
    with ProcessPoolExecutor(max_workers=processes, mp_context=context) as pool:
        pending = [pool.submit(run_one, job, spec, str(init_path), threads, index) for index, spec in enumerate(specs)]
        done, _ = wait(pending, return_when=FIRST_EXCEPTION)
        failed = [future for future in done if future.exception() is not None]
        if failed:
            for future in pending:
                future.cancel()
            error = failed[0].exception()
            if isinstance(error, BrokenProcessPool):
                raise WarpError("a run's process died before it finished (out of memory?)") from None
            raise error
