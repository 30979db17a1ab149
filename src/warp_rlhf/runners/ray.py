"""`backend: ray`: the M runs of an iteration as Ray tasks, on this machine or a cluster.

`RAY_ADDRESS` selects a running cluster; without it a local Ray instance is started. Each task
rebuilds its run from folders (`worker`); the output folder must be on storage every node sees.
A failed task is retried `ray_max_retries` times and resumes from its run's checkpoint; when the
driver stops, its tasks are cancelled.

Nothing waits forever: an address where no cluster answers, or a cluster where no node has the
CPUs and GPUs one run asks for (`ray_num_cpus`, `ray_num_gpus`), is one line before any task is
submitted (Ray itself would retry the connection, or keep the task pending, without a word).

GPUs: Ray gives each task `ray_num_gpus` of a node's GPUs and sets its CUDA_VISIBLE_DEVICES to
them, so a run trains on `cuda`, the first GPU it sees, which is its own (`task_device`): with
`ray_num_gpus: 1` each run has a GPU to itself, with `0.5` two runs share one.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
from pathlib import Path

from warp_rlhf.algorithm.reinforce import RunSpec
from warp_rlhf.config import WarpConfig
from warp_rlhf.errors import WarpError
from warp_rlhf.runners.worker import RunJob, run_one

_started_here: set[str] = set()
"""The Ray jobs this module started (not the caller's), for `shutdown_started`."""
CONNECT_SECONDS = 10.0
"""How long a cluster at `RAY_ADDRESS` has to accept a connection."""


def connect(config: WarpConfig):
    """Ray, connected (or started), with a node that can place one run."""
    try:
        import ray
    except ImportError:
        raise WarpError("backend: ray needs Ray: pip install 'warp-rlhf[ray]'") from None
    _check_device(config)
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS") or None
        if address is not None:
            _check_reachable(address)
        with _caller_signal_handlers():
            ray.init(address=address, include_dashboard=False, log_to_driver=True, configure_logging=False)
        _started_here.add(ray.get_runtime_context().get_job_id())
    _check_resources(ray, config)
    return ray


def _check_device(config: WarpConfig) -> None:
    """A task sees only the GPUs Ray gave it: a named one (cuda:N) may not be among them, and a
    task given none would take a GPU no task reserved."""
    if config.device.startswith("cuda:"):
        raise WarpError(
            f"device={config.device!r} with backend: ray: Ray gives each run its own GPU (ray_num_gpus), "
            "so name none: device auto or cuda"
        )
    if config.device == "cuda" and config.ray_num_gpus == 0:
        raise WarpError("device='cuda' with backend: ray needs ray_num_gpus > 0: a run trains on the GPUs Ray gives it")


def task_device(device: str, gpu_ids: list) -> str:
    """The device a run trains on in a Ray task that Ray gave `gpu_ids` (`ray.get_gpu_ids()`): with
    `device: auto`, `cuda` (its CUDA_VISIBLE_DEVICES are those GPUs) where it was given any, else
    `cpu`, never a GPU that no task reserved; a device the config names, as named."""
    if device != "auto":
        return device
    return "cuda" if gpu_ids else "cpu"


def run_task(job: RunJob, spec: RunSpec, init_path: str, threads: int) -> str:
    """One run as a Ray task (`worker.run_one`), on the device of the GPUs Ray gave it."""
    import ray

    return run_one(job, spec, init_path, threads, device=task_device(job.config.device, ray.get_gpu_ids()))


def _check_reachable(address: str) -> None:
    """Fail in one line unless something accepts a connection at `address` (host:port or
    ray://host:port; `auto` and `local` are Ray's own to resolve)."""
    if address in {"auto", "local"}:
        return
    host, _, port = address.split("://", 1)[-1].rpartition(":")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=CONNECT_SECONDS).close()
    except (OSError, ValueError) as error:
        why = getattr(error, "strerror", None) or str(error) or type(error).__name__
        raise WarpError(
            f"RAY_ADDRESS={address}: no Ray cluster answers there ({why}); start one (`ray start --head`) "
            "or unset RAY_ADDRESS to run on a local one"
        ) from None


class _caller_signal_handlers:  # noqa: N801 (used as a context manager)
    """`ray.init` installs its own SIGTERM handler (which aborts with a stack dump): put the
    caller's handlers back, so a stopped driver ends as it would without Ray."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __enter__(self) -> None:
        main = threading.current_thread() is threading.main_thread()
        self.saved = {sig: signal.getsignal(sig) for sig in self.SIGNALS} if main else {}

    def __exit__(self, *_) -> None:
        for sig, handler in self.saved.items():
            if handler is not None:
                signal.signal(sig, handler)


def _check_resources(ray, config: WarpConfig) -> None:
    """A task that no node can place stays pending forever: refuse it before submitting."""
    wanted = {"CPU": config.ray_num_cpus, "GPU": config.ray_num_gpus}
    nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    if any(all(node.get(name, 0.0) >= amount for name, amount in wanted.items() if amount) for node in nodes):
        return
    have = "; ".join(f"{node.get('CPU', 0):g} CPU, {node.get('GPU', 0):g} GPU" for node in nodes) or "no node"
    raise WarpError(
        f"backend: ray: a run asks for {config.ray_num_cpus:g} CPU and {config.ray_num_gpus:g} GPU "
        f"(ray_num_cpus, ray_num_gpus), but no node of the Ray cluster has them ({have})"
    )


def run_on_ray(job: RunJob, specs: list[RunSpec], init_path: Path) -> None:
    """Run `specs` as parallel Ray tasks and wait for all of them."""
    config = job.config
    ray = connect(config)
    task = ray.remote(
        num_cpus=config.ray_num_cpus,
        num_gpus=config.ray_num_gpus,
        max_retries=config.ray_max_retries,  # a lost worker or node: the task resumes from its checkpoint
        retry_exceptions=False,  # an error of the run (a NaN, bad input) would only happen again
    )(run_task)
    threads = max(1, int(config.ray_num_cpus))
    pending = [task.remote(job, spec, str(init_path), threads) for spec in specs]
    try:
        ray.get(pending)
    except ray.exceptions.RayTaskError as error:
        if isinstance(error.cause, WarpError):  # the run's own one-line error, as the other backends say it
            raise error.cause from None
        raise WarpError(f"a Ray run failed: {_last_line(error)}") from None
    except ray.exceptions.RayError as error:
        raise WarpError(f"a Ray run failed: {_last_line(error)}") from None
    except SystemError as error:  # Ray's C code wraps what a signal handler raised (Ctrl-C, SIGTERM)
        if error.__cause__ is None:
            raise
        raise error.__cause__ from None
    finally:  # a run failed, or the driver stops (Ctrl-C, SIGTERM): no task outlives it
        _, running = ray.wait(pending, num_returns=len(pending), timeout=0)
        for ref in running:
            ray.cancel(ref, force=True)


def _last_line(error: Exception) -> str:
    return str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__


def shutdown_started() -> None:
    """Shut down the Ray instance `connect` started (a caller's own is left running), so that no
    worker's output follows a stopped command's last line."""
    import ray

    if ray.is_initialized() and ray.get_runtime_context().get_job_id() in _started_here:
        _started_here.clear()
        ray.shutdown()
