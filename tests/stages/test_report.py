"""The report and the command's summary say why nothing moved, which data was used, and print a
small KL so that it does not read as zero."""

import json

from tests.helpers import TRAIN_FLAGS
from warp_rlhf.cli import main, results_table
from warp_rlhf.stages.plots import cell
from warp_rlhf.stages.report import unmoved_note


def row(kind: str, kl: float, reward: float = 0.1, **meta) -> dict:
    return {"kind": kind, "kl_exact_mean": kl, "kl_exact_se": kl / 10, "reward_mean": reward, "reward_se": 0.05,
            "kl_k1_mean": kl, "kl_k1_se": kl / 10, **meta}  # fmt: skip


SETTINGS = {"learning_rate": 3e-5, "steps": 100, "beta": 0.1, "seed": 0}


def test_policies_still_at_sft_are_said_in_one_line_naming_the_step_size():
    policies = {
        "sft": row("sft", 0.0), "warp": row("liti", 0.004, nu=1.0),
        "reinforce_12": row("reinforce", 0.5, step=12), "reinforce_24": row("reinforce", 0.003, step=24),
    }  # fmt: skip
    note = unmoved_note(policies, SETTINGS)
    assert note == (
        "Nothing moved: KL to the SFT policy is below 0.01 nats (warp 0.004, reinforce_24 0.003), so the rewards are "
        "the SFT policy's; the step size is set by learning_rate=3e-05, steps=100, beta=0.1 (raise learning_rate or "
        "steps, or lower beta)."
    )
    table = results_table(policies, SETTINGS).splitlines()
    assert table[-1] == note and table[-2].startswith("WARP − SFT reward: 0.000 ± 0.071 (0.0 standard errors)")


def test_policies_that_moved_get_no_note():
    policies = {"sft": row("sft", 0.0), "warp": row("liti", 0.02, nu=1.0), "reinforce_4": row("reinforce", 3, step=4)}
    assert unmoved_note(policies, SETTINGS) == ""
    assert "Nothing moved" not in results_table(policies, SETTINGS)


def test_a_small_kl_keeps_its_digits():
    assert cell(row("liti", 0.004), "kl_exact") == "0.004 ± 0.0004"
    assert cell(row("liti", 2.5), "kl_exact") == "2.500 ± 0.250"
    assert cell(row("sft", 0.0), "kl_exact") == "0.000 ± 0.000"


def test_a_run_that_did_not_move_says_so_in_its_summary_and_report(tiny_args, tmp_path, capsys):
    flags = [*tiny_args, *TRAIN_FLAGS, "--iterations", "1", "--front_points", "2", "--trajectory_points", "1"]
    assert main(["run", *flags, "--learning_rate", "1e-12"]) == 0
    summary = capsys.readouterr().out
    assert "Nothing moved: KL to the SFT policy is below 0.01 nats" in summary
    assert "learning_rate=1e-12, steps=3, beta=0.1" in summary
    report = (tmp_path / "run" / "report.md").read_text()
    assert "Nothing moved" in report and "Data: 40 prompts to train on, 20 held out; 80 reward pairs" in report
    kl = json.loads((tmp_path / "run" / "eval" / "results.json").read_text())["policies"]["warp"]["kl_exact_mean"]
    assert kl < 0.01
