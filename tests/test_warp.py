"""The WARP loop: REINFORCE math, EMA anchor, merges per iteration, learning, resume."""

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import make_tokenizer
from tests.test_merge import hand_slerp
from warp_rlhf import rollout
from warp_rlhf.config import WarpConfig
from warp_rlhf.merge import model_state
from warp_rlhf.models import load_causal_lm
from warp_rlhf.warp import (
    RunSpec,
    Trainer,
    TrainingError,
    advantages,
    new_optimizer,
    prompt_batch,
    save_policy,
    train_warp,
)

PROMPTS = ["the movie", "a film", "the plot was", "it is", "the actor and", "a story", "the scene", "it was"] * 4


def good_fraction(prompts, completions):
    """An easy reward: the fraction of completion words that are 'good'."""
    return torch.tensor([sum(w == "good" for w in c.split()) / max(1, len(c.split())) for c in completions])


def tiny_config(tmp_path, **overrides) -> WarpConfig:
    values = dict(
        output_dir=str(tmp_path), iterations=2, runs=2, steps=4, batch_size=4, max_new_tokens=5,
        learning_rate=3e-3, ema_rate=0.1, beta=0.05, liti_rate=0.5, checkpoint_every=2, seed=0, device="cpu",
    )  # fmt: skip
    return WarpConfig(**(values | overrides))


class CapturingSGD:
    """Optimiser stand-in: records the gradient it is asked to apply, then takes an SGD step."""

    def __init__(self, model, lr: float):
        self.model, self.param_groups, self.grads = model, [{"lr": lr}], {}

    def step(self):
        self.grads = {n: p.grad.clone() for n, p in self.model.named_parameters()}
        with torch.no_grad():
            for p in self.model.parameters():
                p.sub_(self.param_groups[0]["lr"] * p.grad)

    def zero_grad(self, set_to_none=True):
        self.model.zero_grad(set_to_none=set_to_none)


class NoSchedule:
    def step(self):
        pass


def test_advantages_by_hand():
    r = torch.tensor([1.0, 2.0, 6.0])
    assert torch.equal(advantages(r, "none"), r)
    assert torch.allclose(advantages(r, "mean"), torch.tensor([-2.0, -1.0, 3.0]))
    assert torch.allclose(advantages(r, "loo"), torch.tensor([1 - 4.0, 2 - 3.5, 6 - 1.5]))


def test_each_run_has_its_own_prompt_order_covering_every_prompt(tmp_path):
    config = tiny_config(tmp_path, batch_size=8)
    prompts = [f"p{i}" for i in range(16)]
    run_1 = [p for t in range(2) for p in prompt_batch(prompts, config, RunSpec(1, 1, tmp_path, 0.1), t)]
    run_2 = [p for t in range(2) for p in prompt_batch(prompts, config, RunSpec(1, 2, tmp_path, 0.1), t)]
    assert sorted(run_1) == sorted(prompts) == sorted(run_2)  # one epoch each
    assert run_1 != run_2
    assert run_1 == [p for t in range(2) for p in prompt_batch(prompts, config, RunSpec(1, 1, tmp_path, 0.1), t)]


def test_one_step_is_reinforce_with_kl_reward_and_moves_the_ema_anchor(tiny_policy, tmp_path):
    """Recompute the step's gradient by hand from the same samples, then check the EMA."""
    config = tiny_config(tmp_path, beta=0.5, ema_rate=0.25, learning_rate=1e-2)
    policy = load_causal_lm(str(tiny_policy))
    trainer = Trainer(config, policy, make_tokenizer(), good_fraction, PROMPTS)
    spec = RunSpec(1, 1, tmp_path, config.ema_rate)
    with torch.no_grad():  # make the anchor differ from the policy so the KL term matters
        for t in trainer.anchor_state.values():
            t.add_(0.05 * torch.randn_like(t))
    anchor_before = {k: v.clone() for k, v in trainer.anchor_state.items()}
    policy_before = {k: v.clone() for k, v in trainer.policy_state.items()}

    # Hand computation with the same seed the trainer uses for step 0.
    from warp_rlhf.warp import derived_seed

    prompts = prompt_batch(PROMPTS, config, spec, 0)
    torch.manual_seed(derived_seed(config.seed, 1, 1, "step", 0))
    batch = rollout.sample(policy, trainer.tokenizer, prompts, temperature=config.temperature, max_new_tokens=5)
    r = good_fraction(prompts, rollout.decode(trainer.tokenizer, batch))
    logp = rollout.sequence_logprobs(rollout.token_logits(policy, batch, config.temperature), batch)
    with torch.no_grad():
        logp_ema = rollout.sequence_logprobs(rollout.token_logits(trainer.anchor, batch, config.temperature), batch)
    r_beta = r - 0.5 * (logp.detach() - logp_ema)
    (-(r_beta * logp).mean()).backward()
    expected_grads = {n: p.grad.clone() for n, p in policy.named_parameters()}
    policy.zero_grad(set_to_none=True)

    optimizer = CapturingSGD(policy, lr=1.0)
    metrics = trainer.step(spec, 0, optimizer, NoSchedule())
    for name, grad in expected_grads.items():
        assert torch.allclose(optimizer.grads[name], grad, atol=1e-6), name
    assert abs(metrics["kl_to_anchor"] - (logp.detach() - logp_ema).mean().item()) < 1e-5
    # EMA after the optimiser step: θ_ema ← (1 − μ) θ_ema + μ θ.
    for name, anchor in trainer.anchor_state.items():
        expected = 0.75 * anchor_before[name] + 0.25 * trainer.policy_state[name]
        assert torch.allclose(anchor, expected, atol=1e-6)
    assert sum(not torch.equal(trainer.policy_state[n], policy_before[n]) for n in policy_before) > 5


@pytest.mark.parametrize("baseline", ["none", "mean", "loo"])
def test_gradient_accumulation_gives_the_same_update(tiny_policy, tmp_path, baseline):
    grads, metrics = [], []
    for accumulation in (1, 2, 4):
        config = tiny_config(tmp_path, baseline=baseline, grad_accumulation_steps=accumulation, batch_size=8)
        policy = load_causal_lm(str(tiny_policy))
        trainer = Trainer(config, policy, make_tokenizer(), good_fraction, PROMPTS)
        optimizer = CapturingSGD(policy, lr=0.0)
        metrics.append(trainer.step(RunSpec(1, 1, tmp_path, 0.1), 0, optimizer, NoSchedule()))
        grads.append(optimizer.grads)
    for other, other_metrics in zip(grads[1:], metrics[1:], strict=True):
        for name, grad in grads[0].items():
            assert torch.allclose(other[name], grad, atol=1e-6), name
        for key in ("loss", "kl_to_anchor", "reward_beta_mean", "entropy"):
            assert other_metrics[key] == pytest.approx(metrics[0][key], abs=1e-5), key


def train(tmp_path, tiny_policy, config, reward=good_fraction):
    policy = load_causal_lm(str(tiny_policy))
    return train_warp(config, policy, make_tokenizer(), reward, PROMPTS, tmp_path), policy


def test_each_iteration_is_slerp_of_task_vectors_then_liti_towards_the_merge(tiny_policy, tmp_path):
    config = tiny_config(tmp_path, liti_rate=0.3)
    (final, summaries), policy = train(tmp_path, tiny_policy, config)
    sft = {k: v.clone() for k, v in model_state(load_causal_lm(str(tiny_policy))).items()}
    slerp_1 = load_file(tmp_path / "iter_1" / "slerp.safetensors")
    runs_1 = [load_file(tmp_path / "iter_1" / f"run_{m}" / "policy.safetensors") for m in (1, 2)]
    runs_2 = [load_file(tmp_path / "iter_2" / f"run_{m}" / "policy.safetensors") for m in (1, 2)]
    init_2 = {k: 0.7 * sft[k] + 0.3 * slerp_1[k] for k in sft}  # LITI with η = 0.3
    for name in sft:
        expected_1 = sft[name] + hand_slerp(runs_1[0][name] - sft[name], runs_1[1][name] - sft[name], 0.5)
        assert torch.allclose(slerp_1[name], expected_1, atol=1e-5), name
        expected_2 = init_2[name] + hand_slerp(runs_2[0][name] - init_2[name], runs_2[1][name] - init_2[name], 0.5)
        assert torch.allclose(final[name], expected_2, atol=1e-5), name
    init_files = [load_file(tmp_path / f"iter_{i}" / "init.safetensors") for i in (1, 2)]
    assert all(torch.equal(init_files[0][k], sft[k]) for k in sft)  # θ_init of each iteration, on disk
    assert all(torch.allclose(init_files[1][k], init_2[k], atol=1e-6) for k in sft)
    assert [s["iteration"] for s in summaries] == [1, 2] and len(summaries[0]["runs"]) == 2
    rows = [json.loads(line) for line in (tmp_path / "iter_2" / "run_1" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert set(rows[0]) >= {"reward_mean", "reward_std", "kl_to_anchor", "loss", "grad_norm", "entropy",
                            "completion_length", "seconds"}  # fmt: skip
    assert not (tmp_path / "iter_1" / "run_1" / "checkpoint").exists()


def test_final_policy_saves_and_loads_with_from_pretrained(tiny_policy, tmp_path):
    from transformers import AutoModelForCausalLM

    config = tiny_config(tmp_path, iterations=1, steps=2)
    (final, summaries), policy = train(tmp_path, tiny_policy, config)
    save_policy(policy, make_tokenizer(), final, tmp_path / "final", config, {"iterations": summaries})
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    for name, tensor in model_state(loaded).items():
        assert torch.equal(tensor, final[name])
    assert "I=1, M=2, T=2" in (tmp_path / "final" / "README.md").read_text()
    assert (tmp_path / "final" / "model.safetensors").exists()


def test_reward_rises_and_warp_beats_the_sft_policy(tiny_policy, tmp_path):
    config = tiny_config(tmp_path, iterations=2, runs=2, steps=25, batch_size=16, learning_rate=1e-2, beta=0.01)
    (final, _), policy = train(tmp_path, tiny_policy, config)
    for iteration in (1, 2):
        for run in (1, 2):
            done = json.loads((tmp_path / f"iter_{iteration}" / f"run_{run}" / "done.json").read_text())
            assert done["reward_last_10pct"] > done["reward_first_10pct"] + 0.1

    def mean_reward(state) -> float:
        model = load_causal_lm(str(tiny_policy))
        if state is not None:
            from warp_rlhf.merge import copy_into

            copy_into(model, state)
        torch.manual_seed(123)
        batch = rollout.sample(model, make_tokenizer(), PROMPTS * 4, temperature=0.9, max_new_tokens=5)
        return good_fraction(None, rollout.decode(make_tokenizer(), batch)).mean().item()

    sft, warp = mean_reward(None), mean_reward(final)
    assert warp > sft + 0.2, (sft, warp)


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("stop_after", [3, 6, 11])
def test_resume_after_interruption_is_bitwise_equal_and_skips_finished_runs(tiny_policy, tmp_path, stop_after):
    config = tiny_config(tmp_path, steps=4, checkpoint_every=2)
    (reference, _), _ = train(tmp_path / "uninterrupted", tiny_policy, config)

    calls = {"n": 0}
    original = Trainer.step

    def counting_step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > stop_after and calls.get("interrupt", True):
            raise Interrupt
        return original(self, *args, **kwargs)

    Trainer.step = counting_step
    try:
        with pytest.raises(Interrupt):
            train(tmp_path / "resumed", tiny_policy, config)
        calls.update(n=0, interrupt=False)
        (resumed, _), _ = train(tmp_path / "resumed", tiny_policy, config)
    finally:
        Trainer.step = original
    total = config.iterations * config.runs * config.steps
    finished_before = stop_after - stop_after % config.checkpoint_every  # steps kept by runs and checkpoints
    assert calls["n"] == total - finished_before
    for name, tensor in reference.items():
        assert torch.equal(resumed[name], tensor), name


def test_non_finite_reward_stops_with_a_clear_message(tiny_policy, tmp_path):
    config = tiny_config(tmp_path, iterations=1, runs=1, steps=3)

    def broken(prompts, completions):
        return torch.full((len(completions),), float("nan"))

    with pytest.raises(TrainingError, match="iter 1 run 1 step 1: the reward is not finite"):
        train(tmp_path, tiny_policy, config, reward=broken)


def test_train_command_refuses_an_unfinished_run_without_resume(tiny_args, tmp_path, capsys):
    from warp_rlhf.cli import main

    args = ["train", *tiny_args, "--steps", "2", "--batch_size", "4", "--iterations", "1", "--reward_epochs", "0.2"]
    (tmp_path / "run" / "iter_1" / "run_1").mkdir(parents=True)
    with pytest.raises(SystemExit) as stop:
        main(args)
    assert stop.value.code == 2 and "unfinished warp run: pass --resume" in capsys.readouterr().err
    assert main([*args, "--resume"]) == 0
    assert (tmp_path / "run" / "final" / "config.json").exists()
    assert "from_pretrained" in capsys.readouterr().out


def test_adam_moments_allocated_up_front_update_like_lazily_created_ones(tiny_policy, tmp_path):
    config = tiny_config(tmp_path, learning_rate=1e-2)
    eager = load_causal_lm(str(tiny_policy))
    lazy = load_causal_lm(str(tiny_policy))
    optimizer, _ = new_optimizer(eager, config)
    assert all(state["exp_avg"].shape == p.shape for p, state in optimizer.state.items())
    reference = torch.optim.AdamW(lazy.parameters(), lr=1e-2, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        for a, b in zip(eager.parameters(), lazy.parameters(), strict=True):
            a.grad = torch.randn(a.shape, generator=g)
            b.grad = a.grad.clone()
        optimizer.step()
        reference.step()
    for (name, a), b in zip(eager.named_parameters(), lazy.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), name
    assert not torch.equal(next(eager.parameters()), next(load_causal_lm(str(tiny_policy)).parameters()))
