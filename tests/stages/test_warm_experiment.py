"""`warp-rlhf experiment` with `experiment: warm` end to end on tiny models: the proxies and the
gold model trained on disjoint pairs, accuracies that agree with the reward stage's own, WARP
trained against member 1 and against WARM, every claim answered, and a second call reusing all."""

import json
import os
from pathlib import Path

import pytest
import torch
import yaml

from warp_rlhf.cli import main
from warp_rlhf.stages.warm_experiment import bootstrap_se, claims_table


@pytest.fixture
def warm_spec(tiny_policy, tiny_backbone, reviews_csv, tmp_path) -> dict:
    config = {
        "policy": str(tiny_policy), "reward_model": str(tiny_backbone), "dataset": str(reviews_csv),
        "output_dir": str(tmp_path / "runs"), "reward_train_pairs": 30, "reward_eval_pairs": 20, "rl_prompts": 20,
        "eval_prompts": 12, "max_new_tokens": 4, "iterations": 1, "runs": 2, "steps": 2, "batch_size": 4,
        "learning_rate": 1e-2, "reward_epochs": 0.5, "reward_models": 2, "device": "cpu",
    }  # fmt: skip
    return {"experiment": "warm", "config": config, "label_noise": [0.0, 0.25], "policy_label_noise": [0.25],
            "gold_pairs": 40, "seeds": [0], "nu": [0.5, 1.0], "report_dir": str(tmp_path / "report")}  # fmt: skip


def test_the_warm_experiment_answers_every_claim_and_resumes(warm_spec, tmp_path):
    (tmp_path / "warm.yaml").write_text(yaml.safe_dump(warm_spec))
    assert main(["experiment", "--config", str(tmp_path / "warm.yaml")]) == 0
    runs, report = tmp_path / "runs", tmp_path / "report"
    results = json.loads((report / "results.json").read_text())

    # the gold model learns from other reviews than the proxies, and from its own number of pairs
    proxies = json.loads((runs / "rewards_noise0" / "data" / "splits.json").read_text())["reward_train"]
    gold = json.loads((runs / "gold" / "data" / "splits.json").read_text())["reward_train"]
    assert len(proxies) == 30 and len(gold) == 40
    assert not {text for pair in proxies for text in pair} & {text for pair in gold for text in pair}

    # (a): the accuracies are the reward stage's own, each with a bootstrap standard error
    for noise in ("0", "0.25"):
        metrics = json.loads((runs / f"rewards_noise{noise}" / "reward_model" / "metrics.json").read_text())
        accuracy = results["accuracy"][noise]
        assert accuracy["warm"]["mean"] == pytest.approx(metrics["eval_pairwise_accuracy"])
        for k, member in enumerate(metrics["members"], start=1):
            assert accuracy[f"member_{k}"]["mean"] == pytest.approx(member["eval_pairwise_accuracy"])
        assert accuracy["ens"]["mean"] == pytest.approx(metrics["ens_eval_pairwise_accuracy"], abs=0.051)
        assert all(row["se"] >= 0 for row in accuracy.values())
        assert accuracy["warm_minus_ens"]["mean"] == pytest.approx(accuracy["warm"]["mean"] - accuracy["ens"]["mean"])
    assert metrics["swapped_pairs"] == round(0.25 * 30)

    # (b): WARP against member 1 and against WARM of the noisy stage, linked, not retrained
    one, warm = runs / "warp_one_noise0.25_seed0", runs / "warp_warm_noise0.25_seed0"
    assert (one / "reward_model").resolve() == (runs / "rewards_noise0.25" / "reward_members" / "member_1").resolve()
    assert (warm / "reward_model").resolve() == (runs / "rewards_noise0.25" / "reward_model").resolve()
    assert (one / "final" / "model.safetensors").exists() and (warm / "final" / "model.safetensors").exists()
    claims = [(c["claim"], c["label_noise"]) for c in results["claims"]]
    assert claims == [("warm_vs_one", 0.0), ("warm_vs_ens", 0.0), ("warm_vs_one", 0.25), ("warm_vs_ens", 0.25),
                      ("gold_reward", 0.25), ("judge", 0.25)]  # fmt: skip
    assert all(c["verdict"] in {"holds", "does not hold", "inconclusive"} for c in results["claims"])
    sft = results["policies"]["sft"]
    assert {"reward_mean", "judge_mean", "reward_one_noise0_25_mean", "reward_warm_noise0_25_mean"} <= set(sft)
    assert sft["reward_mean"] == pytest.approx(sft["reward_gold_mean"])  # the gold model alone is summed
    for name in ("accuracy.png", "gold_reward.png"):
        assert (report / name).read_bytes()[:4] == b"\x89PNG"
    assert (report / "claims.md").read_text() == claims_table(results)

    cached = runs / "evaluation" / "eval" / "policies" / "sft.json"
    before = cached.stat().st_mtime_ns
    assert main(["experiment", "--config", str(tmp_path / "warm.yaml")]) == 0  # everything reused
    assert cached.stat().st_mtime_ns == before
    assert json.loads((report / "results.json").read_text())["claims"] == results["claims"]


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"config": {"reward_models": 1}}, "WARM needs reward_models >= 2"),
        (
            {"policy_label_noise": [0.1]},
            "policy_label_noise=[0.1] is not a list of distinct fractions in [0, 0.5), each",
        ),
        ({"label_noise": [0.5]}, "label_noise=[0.5] is not a list of distinct fractions"),
        ({"gold_pairs": 0}, "gold_pairs=0 is not an integer > 0"),
        ({"nu": [0.5, 1, 1.5]}, "nu=[0.5, 1, 1.5] is not a list of distinct numbers in (0, 1], 1 among them"),
        ({"trajectory": 3}, "unknown key 'trajectory'"),
        ({"experiment": "warp"}, "experiment='warp' is not one of paper, warm"),
    ],
)
def test_a_wrong_warm_experiment_file_is_one_line_before_any_work(changes, named, tmp_path, capsys):
    spec = {"experiment": "warm", "config": {"output_dir": str(tmp_path / "runs"), "reward_models": 3}}
    spec |= changes
    if "config" in changes:
        spec["config"] = {"output_dir": str(tmp_path / "runs"), **changes["config"]}
    (tmp_path / "warm.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(SystemExit) as stop:
        main(["experiment", "--config", str(tmp_path / "warm.yaml")])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and len(err.splitlines()) == 1 and named in err, err
    assert sorted(os.listdir(tmp_path)) == ["warm.yaml"]


def test_bootstrap_standard_errors_match_the_analytic_ones_and_pair_their_values():
    generator = torch.Generator().manual_seed(0)
    a = (torch.rand(4000, generator=generator) < 0.7).double()
    b = a.clone()
    b[:400] = 1 - b[:400]  # b differs from a on one pair in ten
    se = bootstrap_se({"a": a, "b": b, "a_minus_a": a - a, "a_minus_b": a - b}, seed=1)
    assert se["a"] == pytest.approx((0.7 * 0.3 / 4000) ** 0.5, rel=0.1)
    assert se["a_minus_a"] == 0.0
    paired = (a - b).std().item() / 4000**0.5
    assert se["a_minus_b"] == pytest.approx(paired, rel=0.1)
    assert se["a_minus_b"] < (se["a"] ** 2 + se["b"] ** 2) ** 0.5 / 2  # pairing removes the shared variance


def test_the_repository_warm_experiment_file_loads(monkeypatch):
    from warp_rlhf.stages.warm_experiment import WarmExperiment

    monkeypatch.chdir(Path(__file__).resolve().parents[2])
    experiment = WarmExperiment.load("experiments/warm.yaml")
    assert experiment.config.reward_models >= 2 and set(experiment.policy_label_noise) <= set(experiment.label_noise)
    assert str(experiment.report_dir) == "docs/warm"
