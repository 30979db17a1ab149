"""A run's own process (`backend: processes`): `python -m warp_rlhf.runners.child FD`.

It reads the cloudpickled `(job, spec, init_path, threads, bar)` on stdin before anything else, runs
`worker.run_one`, and writes one cloudpickled message to file descriptor FD: None when the run
finished, or its error. cloudpickle carries what plain pickle cannot — reward functions defined in
`__main__` or a notebook, closures, lambdas — by value, and a fresh interpreter imports nothing of
the caller's script (multiprocessing's `spawn` would run the script's top level again).
"""

from __future__ import annotations

import os
import sys


def main(result_fd: int) -> None:
    payload = sys.stdin.buffer.read()  # first: the driver is blocked until it is read
    import threading

    import cloudpickle
    from tqdm.auto import tqdm

    tqdm.set_lock(threading.RLock())  # not its default multiprocessing lock, which a terminated run would leak
    try:
        job, spec, init_path, threads, bar = cloudpickle.loads(payload)
        from warp_rlhf.runners.worker import run_one

        run_one(job, spec, init_path, threads, bar)
        message = None
    except Exception as error:  # noqa: BLE001 (the driver raises it)
        message = error
    with os.fdopen(result_fd, "wb") as result:
        result.write(portable(message))


def portable(error: Exception | None) -> bytes:
    """`error`, cloudpickled so that the driver can load it: a user's one-line error as it is; any
    other with the run process's traceback as a note, or as a `WarpError` of its first line."""
    import traceback

    import cloudpickle

    from warp_rlhf.errors import WarpError

    if error is not None and not isinstance(error, WarpError):
        error.add_note("in the run's process:\n" + "".join(traceback.format_exception(error)).rstrip())
    try:
        data = cloudpickle.dumps(error)
        cloudpickle.loads(data)
        return data
    except Exception:  # noqa: BLE001
        first = str(error).splitlines()[0] if str(error) else ""
        return cloudpickle.dumps(WarpError(f"{type(error).__name__}: {first}"))


if __name__ == "__main__":
    main(int(sys.argv[1]))
