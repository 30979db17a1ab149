"""The library leaves the process's global random state as it found it: torch's, Python's
`random` and NumPy's generators are the same before and after the stages run (sampling draws
from seeded generators of its own; HF's Trainer, PEFT and LoRA's dropout run with the global
state saved and put back)."""

import random

import numpy as np
import pytest
import torch

from warp_rlhf.config import load_config
from warp_rlhf.cpu import activations
from warp_rlhf.stages.pipeline import evaluate_stage, prepare_output, reward_stage, train_stage


def global_state() -> tuple:
    return torch.get_rng_state(), random.getstate(), np.random.get_state()


def assert_unchanged(before: tuple, after: tuple) -> None:
    assert torch.equal(before[0], after[0]), "torch's global RNG changed"
    assert before[1] == after[1], "Python's random changed"
    kind, keys, *rest = before[2]
    assert (kind, *rest) == (after[2][0], *after[2][2:]) and np.array_equal(keys, after[2][1]), "NumPy's changed"


def config(tiny_args: list[str], **fields):
    flags = {flag.removeprefix("--"): value for flag, value in zip(tiny_args[::2], tiny_args[1::2], strict=True)}
    return load_config(None, flags | {"reward_epochs": "0.5", **{k: str(v) for k, v in fields.items()}})


def seed_everything_at_random_points() -> None:
    random.seed(11)
    np.random.seed(12)
    torch.manual_seed(13)


def test_the_reward_stage_leaves_the_global_rng_as_it_was(tiny_args):
    seed_everything_at_random_points()
    before = global_state()
    settings = config(tiny_args)
    reward_stage(settings, prepare_output(settings))
    assert_unchanged(before, global_state())


def test_training_and_evaluation_leave_the_global_rng_as_it_was(tiny_args, monkeypatch):
    pytest.importorskip("peft", reason="LoRA needs the [lora] extra, which `make test` installs")
    settings = config(
        tiny_args, iterations=1, runs=2, steps=2, batch_size=4, grad_accumulation_steps=2, baseline="loo",
        lora_r=2, lora_dropout=0.1, save_adapter="true", front_points=2,
    )  # fmt: skip
    out = prepare_output(settings)
    reward_stage(settings, out)
    monkeypatch.setattr(activations, "_RMS_NORM_CLASSES", {})  # its once-per-process check runs here too
    seed_everything_at_random_points()
    before = global_state()
    train_stage(settings, out)
    assert_unchanged(before, global_state())
    evaluate_stage(settings, out)
    assert_unchanged(before, global_state())
