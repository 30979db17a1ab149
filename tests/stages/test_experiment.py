"""`warp-rlhf experiment` end to end on tiny models: every arm trained, every claim compared at
matched KL, the report written and the claims table put into its document; a second call reuses
everything."""

import json

import yaml

from tests.helpers import same_weights
from warp_rlhf.cli import main
from warp_rlhf.stages.experiment import TABLE_BEGIN, TABLE_END, claims_table


def test_the_experiment_answers_every_claim_and_resumes(tiny_policy, tiny_backbone, reviews_csv, tmp_path, capsys):
    config = {
        "policy": str(tiny_policy), "reward_model": str(tiny_backbone), "dataset": str(reviews_csv),
        "output_dir": str(tmp_path / "runs"), "reward_train_pairs": 60, "reward_eval_pairs": 20, "rl_prompts": 40,
        "eval_prompts": 16, "max_new_tokens": 4, "iterations": 2, "runs": 2, "steps": 2, "batch_size": 4,
        "learning_rate": 1e-2, "reward_epochs": 0.5, "device": "cpu",
    }  # fmt: skip
    doc = tmp_path / "claims.md"
    doc.write_text(f"# Claims\n\n{TABLE_BEGIN}\nold\n{TABLE_END}\n\nprose stays\n")
    spec = {"config": config, "seeds": [0, 1], "nu": [0.5, 1.0], "claim_5_runs": 3,
            "report_dir": str(tmp_path / "report"), "claims_doc": str(doc)}  # fmt: skip
    (tmp_path / "paper.yaml").write_text(yaml.safe_dump(spec))
    assert main(["experiment", "--config", str(tmp_path / "paper.yaml")]) == 0
    results = json.loads((tmp_path / "report" / "results.json").read_text())
    claims = {(c["claim"], c["seed"]) for c in results["claims"]}
    assert claims == {("ema_anchor", 0), ("slerp_vs_lerp", 0), ("warp_vs_reinforce", 0), ("warp_vs_reinforce", 1),
                      ("iterations", 0), ("more_runs", 0)}  # fmt: skip
    for claim in results["claims"]:
        assert claim["verdict"] in {"holds", "does not hold", "inconclusive"} and len(claim["differences"]) == 3
    for key in ("ema_anchor", "slerp_vs_lerp", "warp_vs_reinforce", "iterations", "more_runs"):
        assert (tmp_path / "report" / f"{key}.png").read_bytes()[:4] == b"\x89PNG"
    text = doc.read_text()
    assert claims_table(results) in text and "old" not in text and text.endswith("prose stays\n")
    assert results["policies"]["sft"]["n_prompts"] == 16 and results["budget"]["seeds"] == [0, 1]
    # the extra runs of claim 5 start from the linked runs of seed 0, not retrained
    more, warp = tmp_path / "runs" / "more_runs" / "iter_1", tmp_path / "runs" / "warp_seed0" / "iter_1"
    assert (more / "run_1").is_symlink() and same_weights(
        more / "run_1" / "policy.safetensors", warp / "run_1" / "policy.safetensors"
    )
    before = (tmp_path / "runs" / "eval" / "policies" / "sft.json").stat().st_mtime_ns
    assert main(["experiment", "--config", str(tmp_path / "paper.yaml")]) == 0  # everything reused
    assert (tmp_path / "runs" / "eval" / "policies" / "sft.json").stat().st_mtime_ns == before
    assert json.loads((tmp_path / "report" / "results.json").read_text())["claims"] == results["claims"]


def test_an_experiment_without_what_the_claims_need_is_one_line_before_any_work(tmp_path, capsys):
    from tests.helpers import cli_error

    spec = {"config": {"output_dir": str(tmp_path / "runs"), "runs": 1}, "seeds": [0]}
    (tmp_path / "paper.yaml").write_text(yaml.safe_dump(spec))
    line = cli_error(["experiment", "--config", str(tmp_path / "paper.yaml")], capsys)
    assert "the claims need iterations >= 2 and runs >= 2" in line and not (tmp_path / "runs").exists()
