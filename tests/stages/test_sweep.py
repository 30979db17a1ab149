"""`warp-rlhf sweep`: every value is checked before any work, a sweep writes nowhere but under its
output_dir, and its summary and figures carry what the run's own do (every reward, error bars)."""

import csv
import hashlib
import io
import json
import os
from pathlib import Path

import pytest

from tests.helpers import cli_error, tiny_config
from warp_rlhf.cli import main
from warp_rlhf.errors import ConfigError
from warp_rlhf.layout import LOCK_FILE
from warp_rlhf.stages.sweep import fronts_figure, sweep_configs, write_summary

SWEEP_FLAGS = ["--iterations", "1", "--runs", "1", "--steps", "1", "--batch_size", "4", "--reward_epochs", "0.5",
               "--front_points", "2", "--trajectory_points", "1", "--learning_rate", "1e-3"]  # fmt: skip


def snapshot(folder: Path) -> dict[str, tuple]:
    """Every entry under `folder` (links not followed) with its kind, size, time and content; the
    lock file is left out: the command holding the folder rewrites it."""
    found = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = Path(root) / name
            if name == LOCK_FILE:
                continue
            info = path.lstat()
            digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() and not path.is_symlink() else ""
            found[str(path.relative_to(folder))] = (path.is_symlink(), info.st_size, info.st_mtime_ns, digest)
    return found


def test_bad_values_leave_a_finished_sweep_exactly_as_it_was(tiny_args, tmp_path, capsys):
    flags = [*tiny_args, *SWEEP_FLAGS]
    assert main(["sweep", *flags, "--param", "liti_rate", "--values", "0.2"]) == 0
    out, before = tmp_path / "run", snapshot(tmp_path / "run")
    bad = {
        "not a number": (["--param", "liti_rate", "--values", "0.2,abc"], "liti_rate='abc' is not a number"),
        "a path field": (["--param", "cache_dir", "--values", "../../../../x"], "cannot be swept"),
        "the folder itself": (["--param", "output_dir", "--values", "elsewhere"], "cannot be swept"),
        "a model that is not there": (
            ["--param", "policy", "--values", f"{tiny_args[1]},{tmp_path / 'missing'}"], "missing"
        ),
        "finished work made otherwise": (
            ["--param", "liti_rate", "--values", "0.2", "--batch_size", "2"], "batch_size: 4 → 2"
        ),
    }
    for what, (args, message) in bad.items():
        assert message in cli_error(["sweep", *flags, *args], capsys), what
        assert snapshot(out) == before, what
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # nothing beside the folder either


def test_a_bad_value_creates_no_folder(tiny_args, tmp_path, capsys):
    line = cli_error(["sweep", *tiny_args, "--param", "liti_rate", "--values", "0.1,abc"], capsys)
    assert "liti_rate='abc'" in line and not (tmp_path / "run").exists()


def test_every_value_has_one_folder_inside_sweep(tmp_path):
    config = tiny_config(tmp_path / "run")
    configs = sweep_configs(config, "policy", ["../../../../x", "/abs/model", "a/b"])
    folders = [Path(sub.output_dir) for _, sub in configs]
    assert [f.name for f in folders] == ["policy=.._.._.._.._x", "policy=_abs_model", "policy=a_b"]
    assert all(f.parent == tmp_path / "run" / "sweep" for f in folders)
    assert [value for value, _ in configs] == ["../../../../x", "/abs/model", "a/b"]
    with pytest.raises(ConfigError, match="would share the folder sweep/policy=a_b"):
        sweep_configs(config, "policy", ["a/b", "a_b"])


def summary_row(value: str, front: dict) -> dict:
    metrics = {"reward_mean": 1.0, "reward_se": 0.1, "reward_good_mean": 0.5, "reward_good_se": 0.05,
               "reward_long_mean": 2.0, "reward_long_se": 0.2, "kl_exact_mean": 3.0, "kl_exact_se": 0.3}  # fmt: skip
    return {"value": value, **metrics, "front": front}


FRONT = {
    "sft": {"kind": "sft", "nu": 0.0, "kl_exact_mean": 0.0, "kl_exact_se": 0.0, "reward_mean": 0.0, "reward_se": 0.1},
    "warp": {"kind": "liti", "nu": 1.0, "kl_exact_mean": 3.0, "kl_exact_se": 0.3, "reward_mean": 1.0, "reward_se": 0.1},
}


def test_the_csv_summary_has_the_json_summary_s_columns(tmp_path):
    write_summary(tmp_path, "liti_rate", [summary_row("0.2", FRONT), summary_row("0.8", FRONT)])
    rows = list(csv.reader(io.StringIO((tmp_path / "sweep" / "summary.csv").read_text())))
    summary = json.loads((tmp_path / "sweep" / "summary.json").read_text())["rows"]
    assert rows[0][0] == "liti_rate" and set(rows[0][1:]) == set(summary[0]) - {"value"}
    assert {"reward_good_mean", "reward_good_se", "reward_long_mean", "reward_long_se"} <= set(rows[0])
    assert [r[0] for r in rows[1:]] == ["0.2", "0.8"] and float(rows[1][rows[0].index("reward_long_se")]) == 0.2


def test_each_value_s_front_has_error_bars_on_reward_and_kl():
    figure = fronts_figure("liti_rate", [summary_row("0.2", FRONT), summary_row("0.8", FRONT)])
    containers = figure.axes[0].containers
    assert [c.get_label() for c in containers] == ["liti_rate=0.2", "liti_rate=0.8"]
    assert all(c.has_xerr and c.has_yerr for c in containers)
