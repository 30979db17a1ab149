import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from warp_rlhf.cli import main
from warp_rlhf.config import DEMO_BUDGET, WarpConfig, dump_config, load_config
from warp_rlhf.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]

OUT_OF_RANGE = [
    ("liti_rate", "1.5", "[0, 1]"),
    ("liti_rate", "-0.1", "[0, 1]"),
    ("ema_rate", "0", "(0, 1]"),
    ("ema_rate", "1.01", "(0, 1]"),
    ("ema_rate", "nan", "(0, 1]"),
    ("beta", "-0.1", ">= 0"),
    ("iterations", "0", ">= 1"),
    ("runs", "0", ">= 1"),
    ("steps", "0", ">= 1"),
    ("batch_size", "0", ">= 1"),
    ("temperature", "0", "> 0"),
    ("temperature", "-1", "> 0"),
    ("slerp_lambda", "1.2", "[0, 1]"),
    ("learning_rate", "0", "> 0"),
    ("learning_rate", "inf", "> 0"),
    ("max_new_tokens", "0", ">= 1"),
    ("seed", "-1", ">= 0"),
    ("prompt_min_tokens", "0", ">= 1"),
    ("reward_train_pairs", "0", ">= 1"),
    ("reward_epochs", "0", "> 0"),
    ("baseline", "median", "one of none, mean, loo"),
    ("max_grad_norm", "0", "> 0"),
    ("device", "tpu", "auto, cpu, cuda or cuda:N"),
    ("checkpoint_every", "0", ">= 1"),
]


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as stop:
        main(args)
    return stop.value.code, capsys.readouterr().err


@pytest.mark.parametrize(("name", "value", "allowed"), OUT_OF_RANGE)
def test_out_of_range_is_one_line_exit_2_nothing_written(name, value, allowed, capsys, tmp_path):
    out = tmp_path / "out"
    code, err = run_cli(["train", f"--{name}", value, "--output_dir", str(out)], capsys)
    assert code == 2
    assert err.count("\n") == 1
    assert f"{name}=" in err and allowed in err and "out of range" in err
    assert not out.exists()


@pytest.mark.parametrize(("name", "value", "expected"), [("steps", "abc", "an integer"), ("beta", "x", "a number")])
def test_wrong_type(name, value, expected, capsys):
    code, err = run_cli(["reward", f"--{name}", value], capsys)
    assert code == 2 and f"{name}='{value}' is not {expected}" in err


def test_unknown_flag_suggests_the_field(capsys):
    code, err = run_cli(["train", "--liti_rat", "0.3"], capsys)
    assert code == 2 and "unknown config field 'liti_rat'" in err and "did you mean 'liti_rate'" in err


def test_unknown_yaml_key_suggests_the_field(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("ema_rat: 0.1\n")
    with pytest.raises(ConfigError, match="unknown config field 'ema_rat' \\(did you mean 'ema_rate'\\?\\)"):
        load_config(path)


def test_prompt_range_order():
    with pytest.raises(ConfigError, match="prompt_max_tokens=2 .* >= prompt_min_tokens \\(4\\)"):
        WarpConfig(prompt_min_tokens=4, prompt_max_tokens=2)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a: [1, 2\n", "does not parse at line"),
        ("- 1\n- 2\n", "must hold a mapping"),
        ("steps: 1.5\n", "not an integer"),
        ("steps: 5\nbeta: 0.1\nsteps: 6\n", "does not parse at line 3: the key 'steps' is given twice"),
        ("1: 2\n", "does not parse at line 1: the key 1 is not a field name"),
        ("null: 3\n", "does not parse at line 1: the key null is not a field name"),
        ("? [a, b]\n: 3\n", "does not parse at line 1: a sequence key is not a field name"),
        ("learning_rate: abc\n", "learning_rate='abc' is not a number"),
        ("learning_rate: nan\n", "learning_rate='nan' is not a number"),
    ],
)
def test_bad_yaml(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_missing_config_file(capsys, tmp_path):
    code, err = run_cli(["reward", "--config", str(tmp_path / "nope.yaml")], capsys)
    assert code == 2 and "does not exist" in err


def test_flags_override_file_and_types_are_kept(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("steps: 7\nbeta: 0.2\nliti_rate: 1\n")
    config = load_config(path, {"beta": "0.05", "slerp_lambda": "none"})
    assert (config.steps, config.beta, config.liti_rate, config.slerp_lambda) == (7, 0.05, 1.0, None)
    assert isinstance(config.liti_rate, float)


def test_slerp_lambda_defaults_to_one_over_m():
    assert math.isclose(WarpConfig(runs=4).resolved_slerp_lambda, 0.25)
    assert WarpConfig(runs=2, slerp_lambda=0.7).resolved_slerp_lambda == 0.7
    with pytest.raises(ConfigError, match="slerp_lambda=0.7 .* null or 1/runs"):
        WarpConfig(runs=3, slerp_lambda=0.7)


def test_accumulation_must_divide_the_batch():
    with pytest.raises(ConfigError, match="grad_accumulation_steps=3 .* divide batch_size \\(16\\)"):
        WarpConfig(batch_size=16, grad_accumulation_steps=3)


def test_resolved_config_round_trips(tmp_path):
    config = WarpConfig(steps=3, beta=0.2)
    path = tmp_path / "c.yaml"
    path.write_text(dump_config(config))
    assert load_config(path) == config


def test_demo_yaml_is_the_embedded_default_with_the_demo_budget():
    assert load_config(REPO / "configs" / "demo.yaml") == load_config(demo=True)
    assert load_config(demo=True) == WarpConfig(**DEMO_BUDGET)


def test_gpt2_imdb_yaml_is_the_classic_setup():
    config = load_config(REPO / "configs" / "gpt2-imdb.yaml")
    assert config.policy == "lvwerra/gpt2-imdb"
    assert config.reward_model == "distilbert/distilbert-base-cased"
    assert config.dataset == "stanfordnlp/imdb"
    expected = dict(iterations=2, runs=2, steps=100, ema_rate=0.01, liti_rate=0.5, beta=0.1, batch_size=64)
    assert {k: getattr(config, k) for k in expected} == expected
    assert config.resolved_slerp_lambda == 0.5


def test_console_script_rejects_liti_rate_above_one(tmp_path):
    exe = Path(sys.executable).with_name("warp-rlhf")
    result = subprocess.run(
        [str(exe), "train", "--config", str(REPO / "configs" / "demo.yaml"), "--liti_rate", "1.5"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "liti_rate=1.5" in result.stderr
    assert not (tmp_path / "runs").exists()


def test_saved_config_is_yaml_of_every_field():
    data = yaml.safe_load(dump_config(WarpConfig()))
    assert set(data) == set(WarpConfig.__dataclass_fields__)


def test_the_configuration_reference_is_generated_from_the_dataclass():
    """docs/configuration.md lists every field as the dataclass has it (`make docs` rewrites it)."""
    from warp_rlhf.config import FIELDS, reference_markdown

    text = (REPO / "docs" / "configuration.md").read_text()
    assert text == reference_markdown(), "docs/configuration.md drifted from WarpConfig: run `make docs`"
    assert all(f"| `{name}` |" in text for name in FIELDS)


def test_every_field_is_a_keyword_field_with_help():
    import dataclasses

    from warp_rlhf.config import WarpConfig

    for f in dataclasses.fields(WarpConfig):
        assert f.metadata.get("help"), f.name
        assert f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING, f.name


@pytest.mark.parametrize("text", ["1e-4", "1E-4", "+1e-4", "0.0001"])
def test_a_number_yaml_reads_as_text_is_a_number(tmp_path, text):
    """YAML 1.1 reads `1e-4` (no dot) as a string; the command line takes it, so the file does too."""
    path = tmp_path / "c.yaml"
    path.write_text(f"learning_rate: {text}\n")
    assert load_config(path).learning_rate == 1e-4


def test_every_field_declares_what_it_affects():
    """`affects` on every field decides which changed settings a resume refuses: a field without it
    would silently be taken as harmless."""
    from warp_rlhf.config import AFFECTS, FIELDS

    for name, f in FIELDS.items():
        assert "affects" in f.metadata, f"{name} does not declare what it affects"
        assert isinstance(f.metadata["affects"], tuple) and set(f.metadata["affects"]) <= set(AFFECTS), name


def test_the_resume_rules_follow_from_affects():
    from warp_rlhf.config import RUN_FIELDS
    from warp_rlhf.stages.output import BASELINE_FIELDS, EVALUATION_FIELDS, FINAL_FIELDS, SPLIT_FIELDS, WARP_RUN_FIELDS

    assert {"dataset", "seed", "max_new_tokens"} <= SPLIT_FIELDS and "learning_rate" not in SPLIT_FIELDS
    assert {"anchor", "liti_rate", "learning_rate", "reward_funcs", "dataset"} <= WARP_RUN_FIELDS
    assert not {"baseline_anchor", "iterations", "device", "backend", "front_points"} & WARP_RUN_FIELDS
    assert {"iterations", "save_adapter"} <= FINAL_FIELDS - WARP_RUN_FIELDS
    assert {"baseline_anchor", "trajectory_points", "iterations"} <= BASELINE_FIELDS and "anchor" not in BASELINE_FIELDS
    assert {"temperature", "judge", "reward_weights"} <= EVALUATION_FIELDS and "learning_rate" not in EVALUATION_FIELDS
    assert {"anchor", "baseline_anchor", "reward_funcs", "lora_r"} <= set(RUN_FIELDS) and "steps" not in RUN_FIELDS


@pytest.mark.parametrize("device", ["cuda", "cuda:7"])
def test_a_cuda_device_without_cuda_is_one_line(device, tiny_args, capsys, monkeypatch, tmp_path):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    code, err = run_cli(["train", *tiny_args, "--device", device, "--output_dir", str(tmp_path / "x")], capsys)
    assert code == 2 and err.strip().splitlines() == [
        f"warp-rlhf: error: device={device!r}: this torch has no CUDA device (use cpu or auto)"
    ]
    assert not (tmp_path / "x").exists()
