"""`warp-rlhf compare`: evaluated output folders at matched KL, paired over prompts, or one line
saying why they cannot be paired."""

import dataclasses
import json
import random
from pathlib import Path

import pytest
import yaml

from tests.helpers import TRAIN_FLAGS, cli_error, share_reward_model
from warp_rlhf.cli import main
from warp_rlhf.stages.evaluate import Samples

N = 60
RNG = random.Random(0)
BASE = [RNG.gauss(0, 3) for _ in range(N)]  # each prompt's own effect on the reward, shared by every policy
PROMPTS = [f"prompt {i}" for i in range(N)]


def samples(kl: float, reward: float, prompts=PROMPTS, base=BASE, completion: str = " sft") -> Samples:
    noise = random.Random(int(kl * 1000))
    return Samples(
        prompts=list(prompts), completions=[completion] * len(prompts), reward=[b + reward for b in base],
        kl_k1=[kl] * len(prompts), kl_exact=[max(0.0, kl + noise.gauss(0, 0.05)) if kl else 0.0 for _ in prompts],
        length=[4.0] * len(prompts),
    )  # fmt: skip


def evaluated_run(folder: Path, slope: float, *, kind: str = "liti", seed: int = 0, sft: Samples | None = None) -> Path:
    """An output folder as `evaluate` leaves it: config.yaml and eval/policies/, the SFT point and a
    curve of reward = slope · KL at KL 1, 2, 4."""
    policies = folder / "eval" / "policies"
    policies.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump({"seed": seed}))
    points = {"sft": ({"kind": "sft", "nu": 0.0}, sft or samples(0.0, 0.0))}
    for index, kl in enumerate((1.0, 2.0, 4.0), 1):
        meta = {"kind": "liti", "nu": index / 3} if kind == "liti" else {"kind": "reinforce", "step": 10 * index}
        points[f"point_{index}"] = (meta, samples(kl, slope * kl, completion=f" {slope} {kl}"))
    for name, (meta, values) in points.items():
        (policies / f"{name}.json").write_text(json.dumps({"meta": meta, "samples": dataclasses.asdict(values)}))
    return folder


def test_a_front_above_another_holds_with_paired_errors_and_writes_its_figure(tmp_path, capsys):
    a, b = evaluated_run(tmp_path / "a", 0.5), evaluated_run(tmp_path / "b", 0.3, kind="reinforce")
    out = tmp_path / "compared"
    assert main(["compare", str(a), str(b), "--output_dir", str(out)]) == 0
    line = capsys.readouterr().out.splitlines()[0]
    assert line.startswith(f"{a} (WARP LITI front) − {b} (REINFORCE trajectory), reward at matched KL: +")
    assert line.endswith("(holds)")
    results = json.loads((out / "compare.json").read_text())
    (comparison,) = results["comparisons"]
    for d in comparison["differences"]:  # 0.2 per nat, the prompts' shared effect paired away
        assert d["difference"] == pytest.approx(0.2 * d["kl"], rel=0.1) and d["se"] < 0.05
    assert comparison["endpoints"]["reward_difference"] == pytest.approx(0.2 * 4)
    assert sorted(p.name for p in out.iterdir()) == ["compare.json", "compare.md", "reward_vs_kl.png"]
    table = (out / "compare.md").read_text()
    assert "Verdict: **holds**" in table and f"| {a} (WARP LITI front) | point_3 |" in table
    assert main(["compare", str(a), str(b), "--output_dir", str(out)]) == 0  # its own files, written again


def test_the_default_folder_is_compare_in_the_working_folder(tmp_path, monkeypatch):
    for name in ("a", "b"):
        evaluated_run(tmp_path / name, 0.5)
    monkeypatch.chdir(tmp_path)
    assert main(["compare", "a", "b"]) == 0
    (comparison,) = json.loads((tmp_path / "compare" / "compare.json").read_text())["comparisons"]
    assert comparison["verdict"] == "inconclusive"  # the same curve: every difference 0


UNPAIRED = {
    "other prompts": (dict(sft=samples(0.0, 0.0, prompts=[f"other {i}" for i in range(N)])),
                      "they were evaluated on other held-out prompts (prompt 1 differs: other data or seed)"),
    "fewer prompts": (dict(sft=samples(0.0, 0.0, prompts=PROMPTS[:30], base=BASE[:30])),
                      "they were evaluated on 60 and 30 held-out prompts"),
    "another seed": (dict(seed=1), "they were evaluated with other seeds (seed 0 and 1)"),
    "another SFT policy": (dict(sft=samples(0.0, 0.0, completion=" other")), "their SFT policies wrote other"),
    "another reward": (dict(sft=samples(0.0, 1.0)), "they score the same SFT completions differently"),
}  # fmt: skip


@pytest.mark.parametrize(("changes", "why"), UNPAIRED.values(), ids=UNPAIRED.keys())
def test_runs_that_do_not_pair_are_one_line_saying_why(changes, why, tmp_path, capsys):
    a, b = evaluated_run(tmp_path / "a", 0.5), evaluated_run(tmp_path / "b", 0.3, **changes)
    line = cli_error(["compare", str(a), str(b), "--output_dir", str(tmp_path / "out")], capsys)
    assert line.startswith(f"warp-rlhf: error: {a} and {b} cannot be compared: ") and why in line
    assert not (tmp_path / "out").exists()


def test_what_is_not_an_evaluated_run_is_refused_before_anything_is_written(tmp_path, capsys):
    a = evaluated_run(tmp_path / "a", 0.5)
    (tmp_path / "trained").mkdir()
    cases = {
        "one run": ([str(a)], "compare needs at least two evaluated output folders"),
        "a missing run": ([str(a), str(tmp_path / "nope")], f"run {tmp_path / 'nope'} does not exist"),
        "no evaluation": ([str(a), str(tmp_path / "trained")],
                          f"run `warp-rlhf evaluate --output_dir {tmp_path / 'trained'} --resume` first"),
        "a flag": ([str(a), str(a), "--steps", "3"], "compare takes output folders and --output_dir only"),
    }  # fmt: skip
    for args, message in cases.values():
        assert message in cli_error(["compare", *args, "--output_dir", str(tmp_path / "out")], capsys)
    assert not (tmp_path / "out").exists()


def test_a_folder_of_other_files_is_not_written_into(tmp_path, capsys):
    a, b = evaluated_run(tmp_path / "a", 0.5), evaluated_run(tmp_path / "b", 0.3)
    line = cli_error(["compare", str(a), str(b), "--output_dir", str(a)], capsys)
    assert f"--output_dir {a} holds files compare did not write (config.yaml, eval)" in line


def test_two_real_runs_compare_from_the_command_line(tiny_args, tmp_path, capsys):
    """Two learning rates on the tiny models, the same reward model and data: they pair."""
    flags = [*tiny_args, *TRAIN_FLAGS, "--iterations", "1", "--front_points", "3", "--trajectory_points", "2"]
    assert main(["run", *flags]) == 0
    share_reward_model(tmp_path / "run", tmp_path / "faster")
    assert main(["run", *flags, "--output_dir", str(tmp_path / "faster"), "--learning_rate", "3e-3"]) == 0
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "faster"), str(tmp_path / "run"), "--output_dir", str(tmp_path / "c")]) == 0
    assert "reward at matched KL" in capsys.readouterr().out
    results = json.loads((tmp_path / "c" / "compare.json").read_text())
    assert len(results["comparisons"][0]["differences"]) == 3 and results["n_prompts"] == 20
