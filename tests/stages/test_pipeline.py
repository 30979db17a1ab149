"""`warp-rlhf run` end to end on tiny models: reward → WARP → baseline → evaluation → files."""

import csv
import json

from warp_rlhf.cli import main

RUN_FLAGS = [
    "--iterations", "2", "--runs", "2", "--steps", "2", "--batch_size", "4", "--reward_epochs", "0.5",
    "--front_points", "3", "--trajectory_points", "2", "--learning_rate", "1e-3",
]  # fmt: skip


def test_run_writes_results_completions_and_plots(tiny_args, tmp_path, capsys):
    assert main(["run", *tiny_args, *RUN_FLAGS]) == 0
    out = tmp_path / "run"
    results = json.loads((out / "eval" / "results.json").read_text())
    policies = results["policies"]
    assert set(policies) == {"sft", "liti_0.5", "warp", "iter_1", "reinforce_4", "reinforce_8"}
    keys = {"reward_mean", "reward_se", "judge_mean", "judge_se", "kl_k1_mean", "kl_k1_se", "kl_exact_mean",
            "kl_exact_se", "n_prompts", "distinct_1", "distinct_2", "length_mean"}  # fmt: skip
    for row in policies.values():
        assert keys <= set(row) and row["n_prompts"] == 20
    assert abs(policies["sft"]["kl_exact_mean"]) < 1e-5 and abs(policies["sft"]["kl_k1_mean"]) < 1e-5
    assert policies["warp"]["kl_exact_mean"] > policies["liti_0.5"]["kl_exact_mean"] > 0
    lines = (out / "eval" / "completions.jsonl").read_text().splitlines()
    assert len(lines) == 6 * 20 and set(json.loads(lines[0])) == {"policy", "prompt", "completion", "reward", "judge"}
    with open(out / "eval" / "results.csv") as handle:
        assert sorted(row["policy"] for row in csv.DictReader(handle)) == sorted(policies)
    for plot in ("reward_vs_kl.png", "judge_vs_kl.png", "training_curves.png"):
        assert (out / "eval" / plot).read_bytes()[:4] == b"\x89PNG"
    assert (out / "reinforce" / "final" / "config.json").exists()
    report = (out / "report.md").read_text()
    expected = ["| sft |", "| warp |", "| reinforce_8 |", "![reward_vs_kl](eval/reward_vs_kl.png)"]
    expected += ["| train warp |", "| train reinforce |", "| evaluate |", "Prompt: `", "iterations: 2"]
    for text in expected:
        assert text in report, text
    printed = capsys.readouterr().out
    assert "sft" in printed and "warp" in printed and "reinforce_8" in printed


def test_evaluation_is_the_same_for_the_same_seed(tiny_args, tmp_path):
    flags = [*tiny_args, *RUN_FLAGS, "--iterations", "1", "--runs", "1"]
    assert main(["run", *flags]) == 0
    first = json.loads((tmp_path / "run" / "eval" / "results.json").read_text())
    import shutil

    shutil.rmtree(tmp_path / "run" / "eval")
    assert main(["evaluate", *flags]) == 0
    assert json.loads((tmp_path / "run" / "eval" / "results.json").read_text()) == first


def test_sweep_over_the_liti_rate_shares_the_reward_model(tiny_args, tmp_path, capsys):
    flags = [*tiny_args, *RUN_FLAGS, "--runs", "2", "--iterations", "2", "--trajectory_points", "1"]
    assert main(["sweep", *flags, "--param", "liti_rate", "--values", "0.2,0.8"]) == 0
    out = tmp_path / "run"
    summary = json.loads((out / "sweep" / "summary.json").read_text())
    assert [row["value"] for row in summary["rows"]] == ["0.2", "0.8"]
    for value in ("0.2", "0.8"):
        sub = out / "sweep" / f"liti_rate={value}"
        assert (sub / "reward_model").is_symlink() and (sub / "eval" / "results.json").exists()
    assert (out / "sweep" / "fronts.png").exists() and (out / "sweep" / "metrics_vs_value.png").exists()
    assert "| 0.2 |" in (out / "report.md").read_text()
    # Different η, same first iteration: iter_1 merges are identical, the final policies are not.
    first = [
        json.loads((out / "sweep" / f"liti_rate={v}" / "eval" / "results.json").read_text()) for v in ("0.2", "0.8")
    ]
    assert first[0]["policies"]["iter_1"]["reward_mean"] == first[1]["policies"]["iter_1"]["reward_mean"]
    assert first[0]["policies"]["warp"]["kl_exact_mean"] != first[1]["policies"]["warp"]["kl_exact_mean"]
    assert "liti_rate=0.2" in capsys.readouterr().out


def test_sweep_rejects_a_bad_value_before_running(tiny_args, tmp_path, capsys):
    import pytest

    with pytest.raises(SystemExit) as stop:
        main(["sweep", *tiny_args, "--param", "liti_rate", "--values", "0.2,1.5"])
    assert stop.value.code == 2 and "liti_rate=1.5 is out of range" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
