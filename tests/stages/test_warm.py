"""WARM: K reward models from one backbone (member k with seed + k − 1), their weight average as
`reward_model/`, ENS (the mean of the members' scores), seeded label noise, resume member by member."""

import contextlib
import io
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import cli_error, make_tokenizer, same_weights
from warp_rlhf.algorithm.reinforce import Prompt
from warp_rlhf.cli import main
from warp_rlhf.config import WarpConfig
from warp_rlhf.errors import ConfigError
from warp_rlhf.layout import OutputDir
from warp_rlhf.stages.report import write_report
from warp_rlhf.stages.reward import (
    EnsembleRewardModel,
    RewardModel,
    pairwise_accuracy,
    swap_labels,
    train_reward_models,
    trained_reward,
)
from warp_rlhf.stages.rewards import build_reward
from warp_rlhf.stages.sweep import share_data

FAST = ["--reward_epochs", "1", "--reward_learning_rate", "3e-3"]
WARM = [*FAST, "--reward_models", "3", "--reward_learning_rates", "3e-3,2e-3,1e-3", "--reward_label_noise", "0.1"]


@pytest.fixture(scope="module")
def warm_run(tiny_policy, tiny_backbone, reviews_csv, tmp_path_factory):
    """`warp-rlhf reward` with 3 members, each its own learning rate, and 10% of the pairs swapped:
    (the flags without output_dir, the output folder, the command's line). Trained once; a test
    that changes the folder works on a copy (`copy_of`)."""
    inputs = {"policy": tiny_policy, "reward_model": tiny_backbone, "dataset": reviews_csv}
    sizes = {"reward_train_pairs": 80, "reward_eval_pairs": 40, "rl_prompts": 40, "eval_prompts": 20}
    flags = [part for name, value in (inputs | sizes).items() for part in (f"--{name}", str(value))] + WARM
    out = tmp_path_factory.mktemp("warm") / "run"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["reward", *flags, "--max_new_tokens", "6", "--output_dir", str(out)]) == 0
    return [*flags, "--max_new_tokens", "6"], out, printed.getvalue()


def copy_of(warm_run, tmp_path) -> tuple[list[str], OutputDir]:
    """The reward command's flags writing into a copy of the trained folder, and the copy's paths."""
    flags, out, _ = warm_run
    shutil.copytree(out, tmp_path / "run")
    return ["reward", *flags, "--output_dir", str(tmp_path / "run")], OutputDir(tmp_path / "run")


def model_file(folder) -> str:
    return str(folder / "model.safetensors")


def test_three_members_are_averaged_into_a_loadable_reward_model(warm_run, tmp_path):
    _, out, line = warm_run
    paths = OutputDir(out)
    metrics = json.loads(paths.reward_metrics.read_text())
    members = metrics["members"]
    assert [(m["seed"], m["learning_rate"]) for m in members] == [(0, 3e-3), (1, 2e-3), (2, 1e-3)]
    assert all(0 <= m["eval_pairwise_accuracy"] <= 1 for m in members)
    assert metrics["swapped_pairs"] == 8 and metrics["train_pairs"] == 80 and metrics["eval_pairs"] == 40
    assert "weight average of 3 members at " in line and "; ENS " in line and "8 of 80 training pairs swapped" in line

    weights = [load_file(model_file(paths.reward_member(k))) for k in (1, 2, 3)]
    average = load_file(model_file(paths.reward_model))
    assert average.keys() == weights[0].keys()
    assert not torch.equal(weights[0]["classifier.weight"], weights[1]["classifier.weight"])  # trained apart
    for name, tensor in average.items():
        assert torch.allclose(tensor, sum(w[name] for w in weights) / 3, atol=1e-7), name
    held_out = [tuple(p) for p in json.loads(paths.splits.read_text())["reward_eval"]]
    average_accuracy = pairwise_accuracy(RewardModel.from_pretrained(paths.reward_model), held_out)
    assert average_accuracy == pytest.approx(metrics["eval_pairwise_accuracy"], abs=1e-6)
    ens_accuracy = pairwise_accuracy(trained_reward(WarpConfig(reward_models=3, reward_ensemble="ens"), out), held_out)
    assert ens_accuracy == pytest.approx(metrics["ens_eval_pairwise_accuracy"], abs=1e-6)


def test_the_report_shows_the_members_and_ens(warm_run, tmp_path):
    _, paths = copy_of(warm_run, tmp_path)
    metrics = json.loads(paths.reward_metrics.read_text())
    paths.eval.mkdir()
    (paths.eval / "completions.jsonl").write_text("")
    sft = {"kind": "sft", "n_prompts": 20, "length_mean": 6.0, "distinct_1": 0.5, "distinct_2": 0.5}
    sft |= {f"{m}_{s}": 0.0 for m in ("reward", "kl_exact", "kl_k1") for s in ("mean", "se")}
    report = write_report(paths.root, "seed: 0\n", {"policies": {"sft": sft}}).read_text()
    accuracies = ", ".join(f"{m['eval_pairwise_accuracy']:.3f}" for m in metrics["members"])
    ens = metrics["ens_eval_pairwise_accuracy"]
    assert f"accuracy {metrics['eval_pairwise_accuracy']:.3f} (weight average of 3 members at {accuracies}; " in report
    assert f"; ENS {ens:.3f}; 8 of 80 training pairs swapped)." in report


def test_member_1_is_the_single_model_and_label_noise_changes_it(warm_run, tmp_path):
    flags, out, _ = warm_run
    single, clean = tmp_path / "single", tmp_path / "clean"
    one = ["reward", *flags, "--reward_models", "1", "--reward_learning_rates", "3e-3"]  # member 1's settings
    assert main([*one, "--output_dir", str(single)]) == 0
    assert same_weights(model_file(single / "reward_model"), model_file(OutputDir(out).reward_member(1)))
    assert main([*one, "--reward_label_noise", "0", "--output_dir", str(clean)]) == 0
    assert not same_weights(model_file(single / "reward_model"), model_file(clean / "reward_model"))


def test_an_interrupted_member_retrains_alone(warm_run, tmp_path):
    args, paths = copy_of(warm_run, tmp_path)
    kept = {k: paths.reward_member(k).joinpath("metrics.json").read_text() for k in (1, 3)}
    before, average = load_file(model_file(paths.reward_member(2))), load_file(model_file(paths.reward_model))
    for name in ("metrics.json", "model.safetensors"):  # interrupted: member 2 never finished, nor the average
        (paths.reward_member(2) / name).unlink()
    paths.reward_metrics.unlink()
    assert main(args) == 0
    assert {k: paths.reward_member(k).joinpath("metrics.json").read_text() for k in (1, 3)} == kept
    again = load_file(model_file(paths.reward_member(2)))
    assert all(torch.equal(again[name], tensor) for name, tensor in before.items())
    assert all(torch.equal(load_file(model_file(paths.reward_model))[n], t) for n, t in average.items())


def test_ens_scores_with_every_member_and_warm_with_their_average(warm_run):
    _, out, _ = warm_run
    texts = ["good movie", "the plot was awful", "a film"]
    ens = trained_reward(WarpConfig(reward_models=3, reward_ensemble="ens"), out)
    members = [RewardModel.from_pretrained(OutputDir(out).reward_member(k)).score(texts) for k in (1, 2, 3)]
    assert isinstance(ens, EnsembleRewardModel) and ens.tokenizer is not None
    assert torch.allclose(ens.score(texts), sum(members) / 3)
    warm = trained_reward(WarpConfig(reward_models=3), out)
    assert torch.equal(warm.score(texts), RewardModel.from_pretrained(OutputDir(out).reward_model).score(texts))
    assert not torch.allclose(warm.score(texts), ens.score(texts))
    reward = build_reward("trained", WarpConfig(reward_models=3, reward_ensemble="ens"), out, make_tokenizer())
    assert torch.allclose(reward([Prompt("good"), Prompt("the plot")], [" movie", " was awful"]), ens.score(texts[:2]))


def test_label_noise_swaps_a_seeded_fraction_of_the_training_pairs_only():
    pairs = [(f"chosen {i}", f"rejected {i}") for i in range(40)]
    noisy, swapped = swap_labels(pairs, 0.25, seed=7)
    flipped = [i for i, (a, b) in enumerate(noisy) if a.startswith("rejected")]
    assert swapped == len(flipped) == 10 and all(noisy[i] == pairs[i][::-1] for i in flipped)
    assert swap_labels(pairs, 0.25, seed=7) == (noisy, 10) and swap_labels(pairs, 0.25, seed=8)[0] != noisy
    assert swap_labels(pairs, 0.0, seed=7) == (pairs, 0)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"reward_models": 2, "reward_learning_rates": [1e-3]}, "must be 2 number(s) > 0"),
        ({"reward_models": 2, "reward_learning_rates": [1e-3, 0.0]}, "must be 2 number(s) > 0"),
        ({"reward_label_noise": 0.5}, "must be a number in [0, 0.5)"),
        ({"reward_label_noise": -0.1}, "must be a number in [0, 0.5)"),
        ({"reward_ensemble": "mean"}, "must be one of warm, ens"),
        ({"reward_models": 0}, "must be an integer >= 1"),
    ],
)
def test_warm_settings_out_of_range_are_one_line(values, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        WarpConfig(**values)


def test_finished_members_refuse_a_changed_setting(warm_run, tmp_path, capsys):
    args, paths = copy_of(warm_run, tmp_path)
    paths.reward_metrics.unlink()  # only the members are finished
    line = cli_error([*args, "--reward_epochs", "2"], capsys)
    assert "would not match the reward model's finished members (reward_members/)" in line


def test_a_truncated_member_is_one_line_naming_it(warm_run, tmp_path, capsys):
    args, paths = copy_of(warm_run, tmp_path)
    paths.reward_metrics.unlink()
    weights = paths.reward_member(2) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    line = cli_error(args, capsys)
    assert f"{weights} is unreadable" in line and f"delete {paths.reward_member(2)} and run again" in line


def test_a_sweep_value_shares_the_members_too(tmp_path):
    parent, value = OutputDir(tmp_path / "parent"), OutputDir(tmp_path / "value")
    for folder in (parent.reward_model, parent.reward_member(1), parent.splits.parent):
        folder.mkdir(parents=True)
    parent.splits.write_text("{}")
    share_data(parent.root, value.root)
    assert value.reward_member(1).is_dir() and value.reward_members.is_symlink()


def test_averaging_leaves_the_global_rng_as_it_was(warm_run, tmp_path):
    _, paths = copy_of(warm_run, tmp_path)
    paths.reward_metrics.unlink()  # the members are reused: only the average is made
    held_out = [tuple(p) for p in json.loads(paths.splits.read_text())["reward_eval"]]
    config = WarpConfig(reward_models=3, reward_learning_rates=[3e-3, 2e-3, 1e-3], reward_label_noise=0.1)
    torch.manual_seed(13)
    before = torch.get_rng_state()
    train_reward_models(config, "unused: every member is finished", [], held_out, paths.root)
    assert torch.equal(before, torch.get_rng_state()) and paths.reward_metrics.exists()


def test_every_member_starts_from_one_score_head_and_sees_its_own_order(tiny_backbone, tmp_path, monkeypatch):
    """WARM averages weights that start together: the score head is drawn once (with `seed`) for
    every member, and the members differ by the order of their pairs (their own seeds)."""
    import warp_rlhf.stages.reward as reward

    started, make = [], reward._reward_trainer

    def recording(backbone, args, dataset, tokenizer):
        trainer = make(backbone, args, dataset, tokenizer)
        head = {k: v.detach().clone() for k, v in trainer.model.state_dict().items() if k.startswith("classifier")}
        started.append((args.seed, args.data_seed, head))
        return trainer

    monkeypatch.setattr(reward, "_reward_trainer", recording)
    config = WarpConfig(reward_model=str(tiny_backbone), reward_models=2, reward_epochs=0.5, seed=5)
    pairs = [(f"good {i} " * 3, f"bad {i} " * 3) for i in range(16)]
    train_reward_models(config, str(tiny_backbone), pairs, pairs[:4], tmp_path / "run")
    assert [(seed, data_seed) for seed, data_seed, _ in started] == [(5, 5), (5, 6)]
    (_, _, first), (_, _, second) = started
    assert first and all(torch.equal(first[k], second[k]) for k in first)
