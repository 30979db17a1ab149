"""Owning an output folder: the lock, `--overwrite`, other programs' files, and what a changed
setting means on resume (docs/RELIABILITY.md)."""

import shutil
import time

import pytest

from tests.helpers import TRAIN_FLAGS, cli_error, cli_process, same_weights, share_reward_model
from warp_rlhf.cli import main
from warp_rlhf.stages.output import OutputLock


def test_overwrite_removes_warp_rlhfs_own_entries_only(tiny_args, tmp_path, capsys):
    assert main(["reward", *tiny_args, "--reward_epochs", "0.2"]) == 0
    thesis = tmp_path / "run" / "mydocs" / "thesis.tex"
    thesis.parent.mkdir()
    thesis.write_text("years of work")
    assert main(["reward", *tiny_args, "--reward_epochs", "0.3", "--overwrite"]) == 0
    assert thesis.read_text() == "years of work"
    assert "reward_epochs: 0.3" in (tmp_path / "run" / "config.yaml").read_text()


def test_a_folder_of_other_files_is_not_taken(tiny_args, tmp_path, capsys):
    thesis = tmp_path / "run" / "thesis.tex"
    thesis.parent.mkdir()
    thesis.write_text("years of work")
    line = cli_error(["reward", *tiny_args], capsys)
    assert "holds files that are not a warp-rlhf run (thesis.tex): choose a new or empty folder" in line
    assert sorted(p.name for p in thesis.parent.iterdir()) == ["thesis.tex"]
    line = cli_error(["reward", *tiny_args, "--overwrite"], capsys)
    assert "not a warp-rlhf run" in line and thesis.exists()


def test_a_moved_folder_and_training_only_fields_are_taken(tiny_args, tmp_path, capsys):
    assert main(["reward", *tiny_args, "--reward_epochs", "0.2"]) == 0
    shutil.move(tmp_path / "run", tmp_path / "moved")
    args = [*tiny_args, "--output_dir", str(tmp_path / "moved"), "--reward_epochs", "0.2"]
    args += ["--iterations", "1", "--steps", "1", "--batch_size", "2"]  # fields the reward model does not use
    assert main(["train", *args]) == 0
    assert "(reused)" in (main(["reward", *args]) == 0 and capsys.readouterr().out)


def test_a_setting_of_finished_runs_is_refused_and_one_for_what_is_to_come_is_not(tiny_args, tmp_path, capsys):
    args = [*tiny_args, *TRAIN_FLAGS, "--iterations", "1"]
    assert main(["train", *args]) == 0
    line = cli_error(["train", *args, "--steps", "4"], capsys)
    assert "steps: 3 → 4 would not match WARP's finished runs and merges (iter_1/run_1, …)" in line
    assert main(["train", *args, "--front_points", "5", "--backend", "processes", "--checkpoint_every", "2"]) == 0


def test_a_corrected_setting_after_a_failure_restarts_the_unfinished_run(tiny_args, tmp_path, capsys):
    """A run that failed at lr 30 is resumed at lr 1e-3: its checkpoint (made at lr 30) is set
    aside, and the result is bitwise the one of a clean run at 1e-3 on the same reward model."""
    args = [*tiny_args, *TRAIN_FLAGS, "--steps", "6"]
    line = cli_error(["train", *args, "--learning_rate", "30"], capsys)
    assert "iter 1 run 1 step" in line and "the loss is not finite" in line
    assert "kept in" in line and "iter_1/run_1 checkpointed at step" in line
    assert main(["train", *args, "--resume"]) == 0
    assert "its checkpoint was made with learning_rate=30.0, not 0.001: restarting" in capsys.readouterr().err
    assert (tmp_path / "run" / "iter_1" / "run_1" / "checkpoint.previous" / "state.json").exists(), (
        "set aside, not lost"
    )
    clean = tmp_path / "clean"
    clean.mkdir()
    share_reward_model(tmp_path / "run", clean)
    assert main(["train", *args, "--output_dir", str(clean)]) == 0
    assert same_weights(tmp_path / "run" / "final" / "model.safetensors", clean / "final" / "model.safetensors")


def test_the_lock_keeps_a_second_process_out_and_a_dead_holders_lock_is_free(tiny_args, tmp_path):
    out = tmp_path / "run"
    with OutputLock(out):  # held by this process: another one gets one line and exit 2
        other = cli_process(["reward", *tiny_args], stderr=-1, stdout=-3)
        _, err = other.communicate(timeout=120)
        assert other.returncode == 2, err
        assert err.strip().splitlines()[-1].startswith(f"warp-rlhf: error: output_dir {out} is in use by process ")
    holder = cli_process(["train", *tiny_args, *TRAIN_FLAGS], stdout=-3, stderr=-3)
    deadline = time.monotonic() + 120
    while not (out / ".warp-rlhf.lock").exists() or not (out / ".warp-rlhf.lock").read_text():
        assert time.monotonic() < deadline and holder.poll() is None
        time.sleep(0.05)
    holder.kill()  # SIGKILL: no chance to release the lock
    holder.wait()
    with OutputLock(out):  # the kernel released the dead process's lock
        pass


@pytest.mark.slow
def test_two_train_processes_on_one_folder(tiny_args, tmp_path):
    first = cli_process(["train", *tiny_args, *TRAIN_FLAGS], stdout=-3, stderr=-1)
    lock = tmp_path / "run" / ".warp-rlhf.lock"
    deadline = time.monotonic() + 120
    while not lock.exists() or not lock.read_text():
        assert time.monotonic() < deadline and first.poll() is None
        time.sleep(0.05)
    second = cli_process(["train", *tiny_args, *TRAIN_FLAGS, "--resume"], stdout=-3, stderr=-1)
    assert second.wait(timeout=120) == 2 and "is in use by process" in second.stderr.read()
    assert first.wait(timeout=600) == 0, first.stderr.read()
    lines = (tmp_path / "run" / "iter_1" / "run_1" / "metrics.jsonl").read_text().splitlines()
    assert [line.split('"step": ')[1].split(",")[0] for line in lines] == ["1", "2", "3"]


def test_evaluate_does_not_take_overwrite(tiny_args, tmp_path, capsys):
    line = cli_error(["evaluate", *tiny_args, "--overwrite"], capsys)
    assert "evaluate reads what the folder holds: --overwrite would delete it first" in line


def _snapshot(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_a_project_folder_holding_the_config_and_data_is_refused(overwrite, tiny_policy, tiny_backbone, reviews_csv,
                                                                 tmp_path, capsys, monkeypatch):  # fmt: skip
    """`output_dir: .` in a project holding the user's commented config.yaml and data/: every byte kept."""
    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    shutil.copy(reviews_csv, project / "data" / "reviews.csv")
    (project / "config.yaml").write_text(
        f"# my settings\npolicy: {tiny_policy}\nreward_model: {tiny_backbone}\ndataset: data/reviews.csv\n"
        "output_dir: .\nreward_train_pairs: 40\nreward_eval_pairs: 20\n"
    )
    before = _snapshot(project)
    monkeypatch.chdir(project)
    line = cli_error(["reward", "--config", "config.yaml", *overwrite], capsys)
    assert "output_dir . holds files that are not a warp-rlhf run (config.yaml, data)" in line
    assert _snapshot(project) == before


def test_user_entries_with_warp_rlhfs_names_are_neither_deleted_nor_written_over(tiny_args, tmp_path, capsys):
    """A folder of data/train.csv, eval/notes.md and report.md is not warp-rlhf's, whatever the names;
    and in warp-rlhf's own folder, an entry it did not write (report.md before the evaluation) is
    refused, not written over."""
    out = tmp_path / "run"
    for name in ("data/train.csv", "eval/notes.md", "report.md"):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(f"the user's {name}")
    before = _snapshot(out)
    for extra in ([], ["--overwrite"]):
        line = cli_error(["train", *tiny_args, *TRAIN_FLAGS, *extra], capsys)
        assert "holds files that are not a warp-rlhf run (data, eval, report.md)" in line
        assert _snapshot(out) == before
    shutil.rmtree(out)
    assert main(["reward", *tiny_args, "--reward_epochs", "0.2"]) == 0
    (out / "report.md").write_text("the user's report")
    line = cli_error(["reward", *tiny_args, "--reward_epochs", "0.2"], capsys)
    assert f"output_dir {out} holds report.md, which warp-rlhf did not write and would write over" in line
    assert (out / "report.md").read_text() == "the user's report"


def test_an_output_dir_holding_an_input_is_refused(tiny_args, reviews_csv, tmp_path, capsys):
    assert main(["reward", *tiny_args, "--reward_epochs", "0.2"]) == 0
    inside = tmp_path / "run" / "reviews.csv"
    shutil.copy(reviews_csv, inside)
    line = cli_error(["reward", *tiny_args, "--dataset", str(inside), "--overwrite"], capsys)
    assert f"holds dataset {inside}: warp-rlhf could write over or delete it" in line
    assert inside.exists() and (tmp_path / "run" / "reward_model").exists()
    config = tmp_path / "run" / "settings.yaml"
    config.write_text("reward_epochs: 0.2\n")
    line = cli_error(["reward", *tiny_args, "--config", str(config)], capsys)
    assert f"holds the config file {config}" in line and config.exists()


def test_stale_temporaries_are_removed_and_the_users_are_kept(tiny_args, tmp_path, capsys):
    """A SIGKILL between a write and its rename leaves `.<name>.tmp-<pid>`: the next command removes
    those in warp-rlhf's entries, at any depth, and no file of the user's."""
    out = tmp_path / "run"
    assert main(["reward", *tiny_args, "--reward_epochs", "0.2"]) == 0
    stale = [out / "data" / ".splits.json.tmp-999999", out / ".config.yaml.tmp-999999",
             out / "reward_model" / ".metrics.json.tmp-999999",
             out / "reward_model" / ".x.old-999999" / "y"]  # fmt: skip
    for path in stale:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("{")
    users = out / ".draft.tmp-1"
    users.write_text("mine")
    assert main(["reward", *tiny_args, "--reward_epochs", "0.2"]) == 0
    assert not any(path.exists() for path in stale) and users.read_text() == "mine"
    assert not (out / "reward_model" / ".x.old-999999").exists()
