"""The command line when things go wrong late: nothing finished is lost, one line says what
happened and how to go on, and a resumed run ends bitwise where an uninterrupted one does."""

import errno
import os
import shutil
import signal
import time
from pathlib import Path

import pytest

from tests.helpers import TRAIN_FLAGS, cli_error, cli_process, same_weights, share_reward_model
from warp_rlhf.cli import main


@pytest.fixture
def reference(tiny_args, tmp_path) -> Path:
    """An uninterrupted WARP run, and a folder `resumed` holding the same reward model and data."""
    assert main(["train", *tiny_args, *TRAIN_FLAGS, "--output_dir", str(tmp_path / "reference")]) == 0
    share_reward_model(tmp_path / "reference", tmp_path / "resumed")
    return tmp_path / "reference"


def wait_for(path_pattern: str, folder: Path, process, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not list(folder.glob(path_pattern)):
        assert process.poll() is None and time.monotonic() < deadline, "the command ended first"
        time.sleep(0.01)


@pytest.mark.slow
@pytest.mark.parametrize(("sent", "code", "said"), [(signal.SIGINT, 130, "interrupted (Ctrl-C)"),
                                                    (signal.SIGTERM, 143, "stopped (SIGTERM)")])  # fmt: skip
def test_a_signal_is_one_line_and_resuming_ends_bitwise_where_an_uninterrupted_run_does(
    sent, code, said, tiny_args, tmp_path, reference
):
    resumed = tmp_path / "resumed"
    args = [*tiny_args, *TRAIN_FLAGS, "--output_dir", str(resumed), "--resume"]
    process = cli_process(["train", *args], stdout=-3, stderr=-1)
    wait_for("iter_1/run_2/checkpoint/state.json", resumed, process)
    process.send_signal(sent)
    _, err = process.communicate(timeout=120)
    assert process.returncode == code, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"warp-rlhf: {said} during `train`; kept in {resumed}: ") and "--resume" in last
    assert "Traceback" not in err
    assert main(["train", *args]) == 0
    assert same_weights(reference / "final" / "model.safetensors", resumed / "final" / "model.safetensors")


def children(pid: int) -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.add(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue
    return found


def alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.slow
@pytest.mark.parametrize("sent", [signal.SIGTERM, signal.SIGKILL])
def test_a_stopped_driver_takes_its_run_processes_with_it(sent, tiny_args, tmp_path):
    out = tmp_path / "run"
    process = cli_process(["train", *tiny_args, *TRAIN_FLAGS, "--steps", "30", "--backend", "processes"],
                          stdout=-3, stderr=-3)  # fmt: skip
    wait_for("iter_1/run_*/metrics.jsonl", out, process)
    workers = children(process.pid) - {process.pid}
    assert workers, "the runs should be in processes of their own"
    process.send_signal(sent)
    process.wait(timeout=60)
    deadline = time.monotonic() + 30
    while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(pid) for pid in workers)
    assert not list(out.glob("iter_1/run_*/done.json")), "the runs were stopped, not left to finish"


def test_a_late_failure_keeps_everything_finished(tiny_args, tmp_path, capsys):
    """WARP finishes, then the baseline's loss turns non-finite: the line names the baseline, and
    final/, the reward model, the splits and every run stay."""
    line = cli_error(["run", *tiny_args, *TRAIN_FLAGS, "--iterations", "1", "--learning_rate", "30"], capsys)
    assert "REINFORCE baseline step" in line and "the loss is not finite" in line and "kept in" in line
    out = tmp_path / "run"
    for kept in ("final/model.safetensors", "reward_model/metrics.json", "data/splits.json",
                 "iter_1/run_1/done.json", "iter_1/run_2/done.json"):  # fmt: skip
        assert (out / kept).exists(), kept


def test_a_sweep_that_fails_at_its_second_value_keeps_the_first(tiny_args, tmp_path, capsys):
    flags = [*tiny_args, *TRAIN_FLAGS, "--iterations", "1", "--steps", "6", "--front_points", "2"]
    cli_error(["sweep", *flags, "--param", "learning_rate", "--values", "1e-3,30"], capsys)
    assert (tmp_path / "run" / "sweep" / "learning_rate=1e-3" / "eval" / "results.json").exists()


def test_disk_full_is_one_line_keeps_what_finished_and_resumes_bitwise(
    tiny_args, tmp_path, reference, capsys, monkeypatch
):
    from warp_rlhf import checkpoint

    resumed = tmp_path / "resumed"
    args = ["train", *tiny_args, *TRAIN_FLAGS, "--output_dir", str(resumed), "--resume"]
    save, calls = checkpoint.save_file, {"n": 0}

    def fills_up(tensors, filename, metadata=None):
        calls["n"] += 1
        if calls["n"] == 9:  # in the middle of iteration 1's second run
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)
        return save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(checkpoint, "save_file", fills_up)
    line = cli_error(args, capsys)
    assert line.startswith("warp-rlhf: error: no space left on the device writing ") and "kept in" in line
    assert ".tmp-" not in line and "/iter_1/run_2/" in line
    assert (resumed / "iter_1" / "run_1" / "done.json").exists()
    monkeypatch.setattr(checkpoint, "save_file", save)
    assert main(args) == 0
    assert same_weights(reference / "final" / "model.safetensors", resumed / "final" / "model.safetensors")


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_a_truncated_policy_file_is_named_before_any_work(tiny_args, tiny_policy, tmp_path, capsys):
    broken = tmp_path / "policy"
    shutil.copytree(tiny_policy, broken)
    truncate(broken / "model.safetensors")
    line = cli_error(["run", *tiny_args, "--policy", str(broken)], capsys)
    assert f"policy {broken}: {broken / 'model.safetensors'} is unreadable (truncated" in line
    assert not (tmp_path / "run").exists()


def test_a_truncated_checkpoint_offers_to_restart_its_run(tiny_args, tmp_path, capsys):
    args = ["train", *tiny_args, *TRAIN_FLAGS, "--iterations", "1", "--learning_rate", "30", "--steps", "6"]
    cli_error(args, capsys)  # leaves iter_1/run_1/checkpoint
    checkpoint = tmp_path / "run" / "iter_1" / "run_1" / "checkpoint"
    truncate(checkpoint / "optimizer.safetensors")
    line = cli_error([*args, "--resume"], capsys)
    assert f"iter 1 run 1: {checkpoint / 'optimizer.safetensors'} is unreadable (truncated" in line
    assert f"delete {checkpoint} and run again with --resume to restart this run from its init" in line


def test_a_finished_runs_truncated_weights_are_named_before_the_other_run_trains(tiny_args, tmp_path, capsys):
    out = tmp_path / "run"
    process_args = ["train", *tiny_args, *TRAIN_FLAGS, "--iterations", "1"]
    assert main(process_args) == 0
    shutil.rmtree(out / "final")
    (out / "iter_1" / "slerp.safetensors").unlink()
    shutil.rmtree(out / "iter_1" / "run_2")
    truncate(out / "iter_1" / "run_1" / "policy.safetensors")
    line = cli_error([*process_args, "--resume"], capsys)
    assert "iter 1 run 1: " in line and "policy.safetensors is unreadable (truncated" in line
    assert f"delete {out / 'iter_1' / 'run_1'} and run again with --resume to train this run again" in line
    assert not (out / "iter_1" / "run_2").exists(), "found before the other run was trained again"


def test_evaluate_without_a_trained_policy_says_so_and_trains_nothing(tiny_args, tmp_path, capsys):
    line = cli_error(["evaluate", *tiny_args], capsys)
    assert "holds no trained policy to evaluate (no final/, no reinforce/)" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES])
def test_any_write_error_is_one_line_naming_the_file(code, tiny_args, tmp_path, capsys, monkeypatch):
    """A read-only or forbidden eval/ (root ignores file modes, so the error is injected where
    the results are written): one line naming the file, and the reward model's folder kept."""
    from warp_rlhf import checkpoint

    written = checkpoint.write_text

    def refuses_eval(path, text):
        if "eval" in Path(path).parts:
            raise OSError(code, os.strerror(code), str(Path(path).with_name(f".{Path(path).name}.tmp-7")))
        return written(path, text)

    monkeypatch.setattr(checkpoint, "write_text", refuses_eval)
    line = cli_error(["run", *tiny_args, *TRAIN_FLAGS, "--front_points", "2", "--trajectory_points", "1"], capsys)
    assert f"cannot access {tmp_path / 'run' / 'eval'}/" in line and os.strerror(code) in line
    assert ".tmp-" not in line and "kept in" in line
    assert (tmp_path / "run" / "final" / "model.safetensors").exists()
