"""Resuming without retyping: `--resume` alone reads the config saved in output_dir, whose paths are
absolute, so a run continues from any working folder; a flag given is a change the resume rules
check; no refusal offers `--overwrite` as the way to go on."""

import shlex
import shutil
from pathlib import Path

import yaml

from tests.helpers import TRAIN_FLAGS, cli_error
from warp_rlhf.cli import main
from warp_rlhf.config import load_config


def relative_args(tiny_policy: Path, tiny_backbone: Path, reviews_csv: Path, tmp_path: Path) -> list[str]:
    """The tiny run's inputs copied into `tmp_path/project`, named relative to it (the working folder)."""
    project = tmp_path / "project"
    project.mkdir()
    for source in (tiny_policy, tiny_backbone):
        shutil.copytree(source, project / source.name)
    shutil.copy(reviews_csv, project / "reviews.csv")
    return [
        "--policy", "policy", "--reward_model", "backbone", "--dataset", "reviews.csv",
        "--output_dir", str(tmp_path / "run"), "--reward_train_pairs", "80", "--reward_eval_pairs", "40",
        "--rl_prompts", "40", "--eval_prompts", "20", "--max_new_tokens", "6", *TRAIN_FLAGS, "--iterations", "1",
    ]  # fmt: skip


def test_resume_alone_continues_from_another_folder_with_the_saved_config(
    tiny_policy, tiny_backbone, reviews_csv, tmp_path, capsys, monkeypatch
):
    args = relative_args(tiny_policy, tiny_backbone, reviews_csv, tmp_path)
    out, project = tmp_path / "run", tmp_path / "project"
    monkeypatch.chdir(project)
    assert main(["reward", *args]) == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["policy"] == str(project / "policy") and saved["dataset"] == str(project / "reviews.csv")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["train", "--output_dir", str(out), "--resume"]) == 0  # no --config, no flags
    assert (out / "final" / "model.safetensors").exists()
    assert yaml.safe_load((out / "config.yaml").read_text()) == saved
    line = cli_error(["train", "--output_dir", str(out), "--resume", "--steps", "4"], capsys)
    assert "steps: 3 → 4 would not match WARP's finished runs" in line and "--overwrite" not in line
    monkeypatch.chdir(project)  # the relative paths given again from the same folder are the same inputs
    assert main(["train", *args]) == 0


FAILING = [*TRAIN_FLAGS, "--iterations", "1", "--steps", "6", "--learning_rate", "30"]
"""A run whose loss is no longer finite within its steps: it fails, its checkpoint kept."""


def test_the_hint_after_a_failure_is_a_command_that_continues(tiny_args, tmp_path, capsys, monkeypatch):
    """A run fails at learning_rate 30; the line's command, with the corrected rate as its only
    flag, continues it from an unrelated working folder."""
    line = cli_error(["train", *tiny_args, *FAILING], capsys)
    hint = line.split("(continue with `")[1].removesuffix("`)")
    assert hint == f"warp-rlhf train --output_dir {tmp_path / 'run'} --resume"
    monkeypatch.chdir(tmp_path)
    assert main([*shlex.split(hint)[1:], "--learning_rate", "1e-3"]) == 0
    assert (tmp_path / "run" / "final" / "model.safetensors").exists()


def test_an_unfinished_run_without_resume_is_not_offered_overwrite(tiny_args, tmp_path, capsys):
    cli_error(["train", *tiny_args, *FAILING], capsys)
    line = cli_error(["train", *tiny_args, *FAILING[:-2]], capsys)
    assert "holds an unfinished warp run: pass --resume to continue it" in line and "overwrite" not in line


def test_changing_save_adapter_on_a_finished_policy_is_refused_and_not_recorded(tiny_args, tmp_path, capsys):
    args = ["train", *tiny_args, *TRAIN_FLAGS, "--iterations", "1"]
    assert main(args) == 0
    config = (tmp_path / "run" / "config.yaml").read_text()
    line = cli_error([*args, "--save_adapter", "true", "--resume"], capsys)
    assert "save_adapter: False → True would not match the WARP policy (final/)" in line
    assert "overwrite" not in line
    assert (tmp_path / "run" / "config.yaml").read_text() == config


def test_resume_without_a_saved_config_takes_the_flags_and_defaults(tmp_path):
    config = load_config(None, {"output_dir": str(tmp_path / "new"), "steps": "7"}, resume=True)
    assert config.steps == 7 and config.policy == "embedded"


def test_a_reward_file_and_a_classifier_folder_are_saved_absolute(tmp_path, monkeypatch):
    from warp_rlhf.config import WarpConfig, config_to_dict

    monkeypatch.chdir(tmp_path)
    (tmp_path / "rewards.py").write_text("def f(prompts, completions): return [0.0] * len(completions)\n")
    (tmp_path / "clf").mkdir()
    config = WarpConfig(reward_funcs=["rewards.py:f", "clf[POSITIVE]", "trained", "pkg.mod:g"], judge="vader")
    saved = config_to_dict(config)
    assert saved["reward_funcs"] == [f"{tmp_path}/rewards.py:f", f"{tmp_path}/clf[POSITIVE]", "trained", "pkg.mod:g"]
    assert saved["judge"] == "vader" and config.reward_funcs[0] == "rewards.py:f"  # the config itself unchanged


def test_a_folder_saved_with_relative_paths_takes_the_same_relative_paths_again(tmp_path, monkeypatch):
    """A config.yaml that names its inputs relative to the working folder (as earlier versions
    saved it) against the same relative inputs: the same inputs, no change to refuse."""
    from warp_rlhf.config import WarpConfig
    from warp_rlhf.stages.output import check_compatible

    monkeypatch.chdir(tmp_path)
    (tmp_path / "policy").mkdir()
    out = tmp_path / "run"
    (out / "data").mkdir(parents=True)
    (out / "data" / "splits.json").write_text("{}")  # finished work that depends on the policy
    (out / "config.yaml").write_text("policy: policy\nseed: 0\n")
    check_compatible(WarpConfig(policy="policy"), out)
    check_compatible(WarpConfig(policy=str(tmp_path / "policy")), out)
