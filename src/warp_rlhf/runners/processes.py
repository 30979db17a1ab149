"""`backend: processes`: the M runs of an iteration side by side in local processes, the CPU
cores split evenly between them (paper: the runs are independent until merged).

On a CPU this is faster than one run after the other on all the cores: a run's many small
operations, sampling and Python work leave a core idle that the other run then uses
(benchmarks/NOTES.md). Each process rebuilds its run from folders (`worker`), so memory is M
times a run's.

Each run is a fresh interpreter (`runners.child`) given its job on stdin, cloudpickled, and a pipe
back that carries one message: None when the run finished, or the run's own error. Nothing else is
shared, so a driver that stops — however it stops — leaves no semaphore for Python's resource
tracker to warn about.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import signal
import subprocess
import sys
from multiprocessing.connection import wait
from pathlib import Path

import cloudpickle

from warp_rlhf.algorithm.reinforce import RunSpec
from warp_rlhf.errors import WarpError
from warp_rlhf.runners.worker import RunJob


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
    one's progress is in its checkpoint. A driver killed outright takes them with it (`_child_start`).
    """
    processes, threads = side_by_side(job.config.runs)  # by M, not by the runs left: the same threads on resume
    waiting = list(enumerate(specs))
    running: dict[int, tuple[subprocess.Popen, RunSpec]] = {}  # result pipe → (process, run)
    try:
        while waiting or running:
            while waiting and len(running) < processes:
                bar, spec = waiting.pop(0)
                fd, process = _start(cloudpickle.dumps((job, spec, str(init_path), threads, bar)))
                running[fd] = (process, spec)
            for fd in wait(list(running)):
                process, spec = running.pop(fd)
                error = _result(fd, process, spec)
                if error is not None:
                    raise error
    finally:  # a run failed, or the driver stops: the others stop too
        for process, _ in running.values():
            process.terminate()
        for fd, (process, _) in running.items():
            process.wait()
            os.close(fd)


def _start(payload: bytes) -> tuple[int, subprocess.Popen]:
    """A run process given `payload` on stdin; returns the pipe its result comes back on."""
    read_fd, write_fd = os.pipe()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))  # the caller's modules
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "warp_rlhf.runners.child", str(write_fd)],
            stdin=subprocess.PIPE, pass_fds=(write_fd,), preexec_fn=_child_start, env=env,
        )  # fmt: skip
    finally:
        os.close(write_fd)
    with contextlib.suppress(BrokenPipeError):  # a child that died at once: its exit says why
        process.stdin.write(payload)
    with contextlib.suppress(BrokenPipeError):
        process.stdin.close()
    return read_fd, process


def _result(fd: int, process: subprocess.Popen, spec: RunSpec) -> Exception | None:
    """The run's message once its process ends: None, its error, or how it died."""
    with os.fdopen(fd, "rb") as pipe:
        message = pipe.read()
    code = process.wait()
    if message:
        return cloudpickle.loads(message)  # the run's own message, written by `runners.child`
    if code < 0:
        how = f"was killed by signal {-code}{' (out of memory?)' if code == -signal.SIGKILL else ''}"
    else:
        how = f"exited with code {code} before it finished"
    return WarpError(f"{spec.name}: its process {how}")


def _child_start() -> None:
    """In each run process, before it starts: leave Ctrl-C to the driver (which stops the runs),
    and on Linux die with the driver if it is killed (`PR_SET_PDEATHSIG`), so no run outlives it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


_PR_SET_PDEATHSIG = 1
