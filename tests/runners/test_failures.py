"""Backends that cannot run, and runs that fail, are one line: no hang, no traceback, on every backend."""

import signal
import time

import pytest

from tests.helpers import TRAIN_FLAGS, cli_error, cli_process

RAISING = '''
def boom(completions, **kwargs):
    raise ValueError("the judge is out to lunch")
'''


def test_a_ray_address_where_nothing_answers_is_one_line(tiny_args, tmp_path, capsys, monkeypatch):
    pytest.importorskip("ray")
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:9")
    started = time.monotonic()
    line = cli_error(["train", *tiny_args, *TRAIN_FLAGS, "--backend", "ray"], capsys)
    assert "RAY_ADDRESS=127.0.0.1:9: no Ray cluster answers there (Connection refused)" in line
    assert time.monotonic() - started < 60


@pytest.mark.slow
def test_a_run_no_ray_node_can_place_is_one_line(tiny_args, tmp_path, capsys):
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
    try:
        line = cli_error(["train", *tiny_args, *TRAIN_FLAGS, "--backend", "ray", "--ray_num_gpus", "1"], capsys)
    finally:
        ray.shutdown()
    assert "a run asks for 1 CPU and 1 GPU (ray_num_cpus, ray_num_gpus), but no node of the Ray cluster" in line
    assert "2 CPU, 0 GPU" in line


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["local", "processes", "ray"])
def test_a_reward_function_that_raises_is_one_line_on_every_backend(backend, tiny_args, tmp_path):
    if backend == "ray":
        pytest.importorskip("ray")
    (tmp_path / "funcs.py").write_text(RAISING)
    args = ["train", *tiny_args, *TRAIN_FLAGS, "--reward_funcs", f"{tmp_path / 'funcs.py'}:boom",
            "--backend", backend, "--ray_num_cpus", "1"]  # fmt: skip
    process = cli_process(args, stdout=-3, stderr=-1, env_extra={"RAY_AUTH_MODE": "disabled"})
    _, err = process.communicate(timeout=300)
    assert process.returncode == 2, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if "error" in line.lower() and "warp-rlhf" in line]
    assert len(errors) == 1 and "boom raised ValueError: the judge is out to lunch" in errors[0], err


@pytest.mark.slow
def test_sigterm_with_ray_is_one_line_and_143(tiny_args, tmp_path):
    pytest.importorskip("ray")
    out = tmp_path / "run"
    args = ["train", *tiny_args, *TRAIN_FLAGS, "--steps", "30", "--backend", "ray", "--ray_num_cpus", "1"]
    process = cli_process(args, stdout=-3, stderr=-1, env_extra={"RAY_AUTH_MODE": "disabled"})
    deadline = time.monotonic() + 300
    while not list(out.glob("iter_1/run_*/checkpoint/state.json")):
        assert process.poll() is None and time.monotonic() < deadline, "the command ended first"
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("warp-rlhf: stopped (SIGTERM) during `train`; kept in "), err[-3000:]
    assert "SIGTERM received" not in err and "Traceback" not in err



@pytest.mark.slow
@pytest.mark.parametrize("sent", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_a_stopped_processes_run_says_one_line_and_no_leak_warning(sent, tiny_args, tmp_path):
    """After the driver's one line (or none, after SIGKILL), Python's resource tracker has nothing
    to warn about: the runs' processes share no semaphore the driver could leak."""
    out = tmp_path / "run"
    process = cli_process(["train", *tiny_args, *TRAIN_FLAGS, "--steps", "30", "--backend", "processes"],
                          stdout=-3, stderr=-1)  # fmt: skip
    deadline = time.monotonic() + 300
    while not list(out.glob("iter_1/run_*/checkpoint/state.json")):
        assert process.poll() is None and time.monotonic() < deadline, "the command ended first"
        time.sleep(0.05)
    process.send_signal(sent)
    _, err = process.communicate(timeout=120)
    time.sleep(1)  # the tracker, a process of its own, writes after the driver ends
    assert "leaked" not in err and "resource_tracker" not in err, err[-2000:]
    if sent != signal.SIGKILL:  # after a killed run's progress bar, on its line
        assert "warp-rlhf: " in err.strip().splitlines()[-1] and "Traceback" not in err, err[-2000:]
