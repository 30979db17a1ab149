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
    for expected in ("| sft |", "| warp |", "| reinforce_8 |", "![reward_vs_kl](eval/reward_vs_kl.png)",
                     "| train warp |", "| train reinforce |", "| evaluate |", "Prompt: `", "iterations: 2"):  # fmt: skip
        assert expected in report, expected
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
