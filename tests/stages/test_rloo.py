"""TRL's RLOOTrainer as an arm: trained on the run's prompts with the run's own rewards (a user's
function sees the prompt each completion answers, with its columns), saved at the REINFORCE
trajectory's steps in the layout the evaluator reads, and not retrained once done."""

import dataclasses

import pytest
import torch

from tests.helpers import same_weights
from warp_rlhf.algorithm.baseline import trajectory_steps
from warp_rlhf.algorithm.merge import copy_into, model_state
from warp_rlhf.algorithm.reinforce import Prompt
from warp_rlhf.checkpoint import load_tensors
from warp_rlhf.config import WarpConfig, dump_config
from warp_rlhf.errors import ConfigError
from warp_rlhf.stages.models import load_causal_lm
from warp_rlhf.stages.output import check_compatible
from warp_rlhf.stages.rewards import function_spec
from warp_rlhf.stages.rloo import rloo_files, rloo_settings, train_rloo

SEEN: list[tuple[str, str]] = []


def topic_reward(prompts, completions, topic, **kwargs):
    """Rewards length, and records which topic each completion was scored for."""
    SEEN.extend(zip(prompts, topic, strict=True))
    return [float(len(c)) for c in completions]


@pytest.fixture
def config(tiny_policy, tmp_path) -> WarpConfig:
    return WarpConfig(
        policy=str(tiny_policy), output_dir=str(tmp_path / "run"), reward_funcs=[function_spec(topic_reward)],
        iterations=1, runs=2, steps=2, batch_size=4, max_new_tokens=4, learning_rate=1e-2, trajectory_points=2,
        device="cpu", train_seed=3,
    )  # fmt: skip


def test_rloo_trains_on_the_run_s_prompts_and_rewards_and_saves_the_trajectory(config, tiny_policy, tmp_path):
    SEEN.clear()
    prompts = [Prompt(f"prompt {i} is", columns={"topic": f"topic {i}"}) for i in range(8)]
    functions = {function_spec(topic_reward): topic_reward}
    metrics = train_rloo(config, tmp_path / "run", prompts, "ema", functions)

    assert SEEN and all(topic == f"topic {prompt.split()[1]}" for prompt, topic in SEEN)  # each row's own columns
    assert len(SEEN) == 4 * 4  # I·M·T = 4 steps of batch_size 4 completions
    files = rloo_files(config, tmp_path / "run", "ema")
    assert [k for k, _ in files] == trajectory_steps(config) == [2, 4]
    policy = load_causal_lm(str(tiny_policy))
    sft = {k: v.clone() for k, v in model_state(policy).items()}
    for _, path in files:
        copy_into(policy, load_tensors(path))  # the evaluator's layout: the model's own tensor names
    trained = load_tensors(files[0][1])
    assert any(not torch.equal(trained[k], sft[k]) for k in sft) and not same_weights(files[0][1], files[1][1])
    assert metrics["settings"]["sync_ref_model"] is True and metrics["settings"]["ref_model_mixup_alpha"] == 0.01
    assert metrics["settings"]["max_steps"] == 4 and metrics["settings"]["seed"] == 3 and metrics["steps"] == 4

    before = files[1][1].stat().st_mtime_ns
    assert train_rloo(config, tmp_path / "run", prompts, "ema", functions) == metrics  # done: reused
    assert files[1][1].stat().st_mtime_ns == before
    (tmp_path / "run" / "config.yaml").write_text(dump_config(config))  # a changed setting would not match it
    with pytest.raises(ConfigError, match=r"would not match TRL RLOO's trajectory \(rloo_ema/\)"):
        check_compatible(dataclasses.replace(config, learning_rate=5e-3), tmp_path / "run")


def test_the_fixed_reference_variant_never_syncs_and_a_wrong_variant_is_refused(config):
    assert rloo_settings(config, "fixed")["sync_ref_model"] is False
    assert rloo_settings(dataclasses.replace(config, max_grad_norm=None), "ema")["max_grad_norm"] == 0.0  # no clipping
    warmed = rloo_settings(dataclasses.replace(config, warmup_steps=2), "ema")
    assert warmed["lr_scheduler_type"] == "constant_with_warmup" and warmed["warmup_steps"] == 2
    with pytest.raises(ConfigError, match="not one of ema, fixed"):
        rloo_settings(config, "adaptive")
    with pytest.raises(ConfigError, match="batch_size=5 must be even"):
        rloo_settings(dataclasses.replace(config, batch_size=5), "fixed")
    with pytest.raises(ConfigError, match="needs beta > 0"):
        rloo_settings(dataclasses.replace(config, beta=0.0), "ema")
    rloo_settings(dataclasses.replace(config, beta=0.0), "fixed")  # a fixed reference needs no KL term
