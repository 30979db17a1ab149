"""`warp-rlhf experiment` end to end on tiny models: every arm trained, every claim compared at
matched KL, the report written into its own folder and nowhere else; a second call reuses
everything. An experiment file is checked as strictly as a config, before any work."""

import json
import os
import time
from pathlib import Path

import pytest
import yaml

import warp_rlhf.stages.experiment as experiment_module
from tests.helpers import same_weights
from warp_rlhf.cli import main
from warp_rlhf.stages.experiment import Experiment, claims_table

REPO = Path(__file__).resolve().parents[2]


def test_the_experiment_answers_every_claim_and_resumes(
    tiny_policy, tiny_backbone, reviews_csv, tmp_path, capsys, monkeypatch
):
    config = {
        "policy": str(tiny_policy), "reward_model": str(tiny_backbone), "dataset": str(reviews_csv),
        "output_dir": str(tmp_path / "runs"), "reward_train_pairs": 60, "reward_eval_pairs": 20, "rl_prompts": 40,
        "eval_prompts": 16, "max_new_tokens": 4, "iterations": 2, "runs": 2, "steps": 2, "batch_size": 4,
        "learning_rate": 1e-2, "reward_epochs": 0.5, "device": "cpu",
    }  # fmt: skip
    spec = {"config": config, "seeds": [0, 1], "nu": [0.5, 1.0, 1.5], "claim_5_runs": 3, "rloo": ["ema", "fixed"],
            "keep_trajectories": False,
            "report_dir": str(tmp_path / "report")}  # fmt: skip
    (tmp_path / "paper.yaml").write_text(yaml.safe_dump(spec))
    docs = {path: path.stat().st_mtime_ns for path in (REPO / "docs").rglob("*")}
    spent = []  # the seconds of every evaluation, the trajectories' made before the final one included
    evaluate = experiment_module.evaluate_points

    def timed_evaluate(*args):
        started = time.perf_counter()
        try:
            return evaluate(*args)
        finally:
            spent.append(time.perf_counter() - started)

    monkeypatch.setattr(experiment_module, "evaluate_points", timed_evaluate)
    assert main(["experiment", "--config", str(tmp_path / "paper.yaml")]) == 0
    monkeypatch.undo()
    timings = json.loads((tmp_path / "runs" / "timings.json").read_text())
    assert len(spent) == 3 + 4 + 1 and timings["evaluate"] >= sum(spent)  # 3 REINFORCE, 4 RLOO trajectories, the rest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["paper.yaml", "report", "runs"]
    assert {path: path.stat().st_mtime_ns for path in (REPO / "docs").rglob("*")} == docs
    results = json.loads((tmp_path / "report" / "results.json").read_text())
    claims = {(c["claim"], c["seed"]) for c in results["claims"]}
    assert claims == {("ema_anchor", 0), ("slerp_vs_lerp", 0), ("warp_vs_reinforce", 0), ("warp_vs_reinforce", 1),
                      ("warp_extrapolated_vs_reinforce", 0), ("warp_extrapolated_vs_reinforce", 1),
                      ("warp_vs_rloo_ema", 0), ("warp_vs_rloo_ema", 1), ("warp_vs_rloo_fixed", 0),
                      ("warp_vs_rloo_fixed", 1), ("iterations", 0), ("more_runs", 0)}  # fmt: skip
    # TRL's RLOOTrainer arms: their trajectories as dense as REINFORCE's, TRL's settings written
    assert len(results["curves"]["rloo_ema_seed1"]) == len(results["curves"]["reinforce_seed1"]) == 4
    assert results["rloo"]["ema"]["settings"]["sync_ref_model"] is True
    assert results["rloo"]["fixed"]["settings"]["sync_ref_model"] is False
    assert results["rloo"]["ema"]["settings"]["max_steps"] == 2 * 2 * 2  # equal compute: I·M·T steps
    assert results["rloo"]["ema"]["seeds"] == [0, 1] and "seed" not in results["rloo"]["ema"]["settings"]
    assert [row["method"] for row in results["seconds_per_step"]] == ["warp", "reinforce", "rloo_ema", "rloo_fixed"]
    level = results["seed_level"]  # the methods as means over the 2 training seeds
    assert [c["claim"] for c in level["claims"]] == ["warp_vs_reinforce", "warp_vs_rloo_ema", "warp_vs_rloo_fixed"]
    assert all(curve["seeds"] == 2 and len(curve["mean"]) == 21 for curve in level["curves"].values())
    assert (tmp_path / "report" / "seed_level.png").read_bytes()[:4] == b"\x89PNG"
    # ν > 1 extrapolates claim 3's fronts only; its verdicts use the merge's points, ν ≤ 1
    assert results["curves"]["warp_seed0"] == ["warp_seed0_nu0.5", "warp_seed0_nu1", "warp_seed0_nu1.5"]
    assert results["curves"]["iteration_1"] == ["iteration_1_nu0.5", "iteration_1_nu1"]
    assert results["extrapolated"] == ["warp_seed0_nu1.5", "warp_seed1_nu1.5"]
    by_key = {(c["claim"], c["seed"]): c for c in results["claims"]}
    assert by_key[("warp_vs_reinforce", 0)]["endpoints"]["a"] == "warp_seed0_nu1"
    assert by_key[("warp_extrapolated_vs_reinforce", 0)]["endpoints"]["a"] == "warp_seed0_nu1.5"
    for seed in (0, 1):  # A − B across the shared range, for the difference figure
        across = by_key[("warp_vs_reinforce", seed)]["across"]
        assert len(across) == 21 and all(d["se"] > 0 for d in across)
        assert [d["kl"] for d in across] == sorted(d["kl"] for d in across)
    assert (tmp_path / "report" / "warp_vs_reinforce_difference.png").read_bytes()[:4] == b"\x89PNG"
    assert not (tmp_path / "report" / "warp_extrapolated_vs_reinforce.png").exists()
    for claim in results["claims"]:
        assert claim["verdict"] in {"holds", "does not hold", "inconclusive"} and len(claim["differences"]) == 3
    for key in ("ema_anchor", "slerp_vs_lerp", "warp_vs_reinforce", "iterations", "more_runs"):
        assert (tmp_path / "report" / f"{key}.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "report" / "claims.md").read_text() == claims_table(results)
    assert results["policies"]["sft"]["n_prompts"] == 16 and results["budget"]["seeds"] == [0, 1]
    # the extra runs of claim 5 start from the linked runs of seed 0, not retrained
    more, warp = tmp_path / "runs" / "more_runs" / "iter_1", tmp_path / "runs" / "warp_seed0" / "iter_1"
    assert (more / "run_1").is_symlink() and same_weights(
        more / "run_1" / "policy.safetensors", warp / "run_1" / "policy.safetensors"
    )
    # keep_trajectories: false: each trajectory's checkpoints gone once evaluated, its final policy kept
    pruned = (("warp_seed1/reinforce", "policy.safetensors"), ("rloo_fixed_seed0/rloo_fixed", "step_8.safetensors"))
    for folder, final in pruned:
        assert sorted(p.name for p in (tmp_path / "runs" / folder).glob("*.safetensors")) == [final]
    before = (tmp_path / "runs" / "eval" / "policies" / "sft.json").stat().st_mtime_ns
    assert main(["experiment", "--config", str(tmp_path / "paper.yaml")]) == 0  # everything reused
    assert (tmp_path / "runs" / "eval" / "policies" / "sft.json").stat().st_mtime_ns == before
    assert json.loads((tmp_path / "report" / "results.json").read_text())["claims"] == results["claims"]


def test_an_experiment_without_what_the_claims_need_is_one_line_before_any_work(tmp_path, capsys):
    spec = {"config": {"output_dir": str(tmp_path / "runs"), "runs": 1}, "seeds": [0]}
    assert "the claims need iterations >= 2 and runs >= 2" in experiment_error(tmp_path, yaml.safe_dump(spec), capsys)


def experiment_error(tmp_path, text: str, capsys) -> str:
    """`warp-rlhf experiment` on a file of `text`: exit code 2, one line on stderr and nothing
    else, and no folder made; the line."""
    (tmp_path / "paper.yaml").write_text(text)
    with pytest.raises(SystemExit) as stop:
        main(["experiment", "--config", str(tmp_path / "paper.yaml")])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and len(err.splitlines()) == 1 and err.startswith("warp-rlhf: error: "), err
    assert sorted(os.listdir(tmp_path)) == ["paper.yaml"]
    return err.strip()


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("config: [1, 2]", "config=[1, 2] is not a mapping of config fields"),
        ("nu: 0.5", "nu=0.5 is not a list of distinct numbers in (0, 4], 1 among them (past 1: extrapolation)"),
        ("nu: [0.5, 1, 4.5]", "nu=[0.5, 1, 4.5] is not a list of distinct numbers in (0, 4]"),
        ("rloo: [ema, ppo]", "rloo=['ema', 'ppo'] is not a list of distinct references among ema, fixed"),
        ("config: {batch_size: 5}\nrloo: [fixed]", "batch_size=5 must be even"),
        ("keep_trajectories: 0", "keep_trajectories=0 is not true or false"),
        ("nu: [0.5]", "nu=[0.5] is not a list"),
        ("nu: [0.5, 1, 1.0]", "nu=[0.5, 1, 1.0] is not a list of distinct"),
        ("seeds: 7", "seeds=7 is not a non-empty list of distinct integers >= 0"),
        ("seeds: [0, true]", "seeds=[0, True] is not"),
        ("seeds: []", "seeds=[] is not"),
        ("claim_5_runs: many", "claim_5_runs='many' is not an integer > runs (2)"),
        ("claim_5_runs: 2", "claim_5_runs=2 is not an integer > runs (2)"),
        ("report_dir: [a]", "report_dir=['a'] is not a folder (a string)"),
        ("claims: 3", "unknown key 'claims' (keys: experiment, config, seeds, nu, claim_5_runs, rloo, "
         "keep_trajectories, report_dir)"),
        ("1: 2", "key 1"),
        ("config: {1: 2}", "key 1"),
        ("config: {liti_rat: 0.5}", "unknown config field 'liti_rat' (did you mean 'liti_rate'?)"),
        ("config: {liti_rate: high}", "liti_rate='high' is not a number"),
    ],
)
def test_a_wrong_experiment_file_is_one_line_naming_the_key_and_value(tmp_path, capsys, text, named):
    output = f"config: {{output_dir: {tmp_path / 'runs'}}}\n"
    spec = text if text.startswith("config") else output + text
    assert named in experiment_error(tmp_path, spec + "\n", capsys)


def test_the_repository_s_experiment_file_loads_and_reports_into_its_own_folder():
    experiment = Experiment.load(REPO / "experiments" / "paper.yaml")
    assert experiment.report_dir == Path("docs/paper-claims")
    # the budget that made docs/paper-claims/results.json, and its claims
    results = json.loads((REPO / "docs" / "paper-claims" / "results.json").read_text())
    budget, config = results["budget"], experiment.config
    assert (experiment.seeds, experiment.nu, config.steps, config.trajectory_points) == (
        budget["seeds"], budget["nu"], budget["steps"], budget["trajectory_points"],
    )  # fmt: skip
    assert experiment.rloo == list(results["rloo"])
    claims = [(claim.key, claim.seed) for claim in experiment.claims()]
    assert claims == [(c["claim"], c["seed"]) for c in results["claims"]]
