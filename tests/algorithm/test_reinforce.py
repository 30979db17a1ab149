"""One REINFORCE step and run: the paper's gradient by hand, the EMA anchor, micro-batches, errors."""

import pytest
import torch

from tests.helpers import (
    PROMPTS,
    CapturingSGD,
    NoSchedule,
    good_fraction,
    make_tokenizer,
    tiny_config,
    train_tiny_warp,
)
from warp_rlhf import policy as pi
from warp_rlhf.algorithm.reinforce import (
    Prompt,
    RunSpec,
    Trainer,
    TrainingError,
    advantages,
    derived_seed,
    new_optimizer,
    prompt_batch,
)
from warp_rlhf.algorithm.run_loop import train_run
from warp_rlhf.layout import RunFolder
from warp_rlhf.stages.models import load_causal_lm


def test_advantages_by_hand():
    r = torch.tensor([1.0, 2.0, 6.0])
    assert torch.equal(advantages(r, "none"), r)
    assert torch.allclose(advantages(r, "mean"), torch.tensor([-2.0, -1.0, 3.0]))
    assert torch.allclose(advantages(r, "loo"), torch.tensor([1 - 4.0, 2 - 3.5, 6 - 1.5]))


def test_each_run_has_its_own_prompt_order_covering_every_prompt(tmp_path):
    config = tiny_config(tmp_path, batch_size=8)
    prompts = [Prompt(f"p{i}") for i in range(16)]
    run_1 = [
        p.text for t in range(2) for p in prompt_batch(prompts, config, RunSpec(1, 1, RunFolder(tmp_path), 0.1), t)
    ]
    run_2 = [
        p.text for t in range(2) for p in prompt_batch(prompts, config, RunSpec(1, 2, RunFolder(tmp_path), 0.1), t)
    ]
    assert sorted(run_1) == sorted(p.text for p in prompts) == sorted(run_2)  # one epoch each
    assert run_1 != run_2
    assert run_1 == [
        p.text for t in range(2) for p in prompt_batch(prompts, config, RunSpec(1, 1, RunFolder(tmp_path), 0.1), t)
    ]


def test_one_step_is_reinforce_with_kl_reward_and_moves_the_ema_anchor(tiny_policy, tmp_path):
    """Recompute the step's gradient by hand from the same samples, then check the EMA."""
    config = tiny_config(tmp_path, beta=0.5, ema_rate=0.25, learning_rate=1e-2)
    policy = load_causal_lm(str(tiny_policy))
    trainer = Trainer(config, policy, make_tokenizer(), good_fraction, PROMPTS)
    spec = RunSpec(1, 1, RunFolder(tmp_path), config.ema_rate)
    with torch.no_grad():  # make the anchor differ from the policy so the KL term matters
        for t in trainer.anchor_state.values():
            t.add_(0.05 * torch.randn_like(t))
    anchor_before = {k: v.clone() for k, v in trainer.anchor_state.items()}
    policy_before = {k: v.clone() for k, v in trainer.policy_state.items()}

    # Hand computation with the same seed the trainer uses for step 0.
    prompts = prompt_batch(PROMPTS, config, spec, 0)
    torch.manual_seed(derived_seed(config.seed, 1, 1, "step", 0))
    batch = pi.sample(
        policy, trainer.tokenizer, [p.text for p in prompts], temperature=config.temperature, max_new_tokens=5
    )
    r = good_fraction(prompts, pi.decode(trainer.tokenizer, batch))
    logp = pi.sequence_logprobs(pi.token_logits(policy, batch, config.temperature), batch)
    with torch.no_grad():
        logp_ema = pi.sequence_logprobs(pi.token_logits(trainer.anchor, batch, config.temperature), batch)
    r_beta = r - 0.5 * (logp.detach() - logp_ema)
    (-(r_beta * logp).mean()).backward()
    expected_grads = {n: p.grad.clone() for n, p in policy.named_parameters()}
    policy.zero_grad(set_to_none=True)

    optimizer = CapturingSGD(policy, lr=1.0)
    metrics = trainer.step(spec, 0, optimizer, NoSchedule())
    for name, grad in expected_grads.items():
        assert torch.allclose(optimizer.grads[name], grad, atol=1e-6), name
    assert abs(metrics.kl_to_anchor - (logp.detach() - logp_ema).mean().item()) < 1e-5
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
        metrics.append(trainer.step(RunSpec(1, 1, RunFolder(tmp_path), 0.1), 0, optimizer, NoSchedule()))
        grads.append(optimizer.grads)
    for other, other_metrics in zip(grads[1:], metrics[1:], strict=True):
        for name, grad in grads[0].items():
            assert torch.allclose(other[name], grad, atol=1e-6), name
        for key in ("loss", "kl_to_anchor", "reward_beta_mean", "entropy"):
            assert getattr(other_metrics, key) == pytest.approx(getattr(metrics[0], key), abs=1e-5), key


def test_non_finite_reward_stops_with_a_clear_message(tiny_policy, tmp_path):
    config = tiny_config(tmp_path, iterations=1, runs=1, steps=3)

    def broken(prompts, completions, completion_ids=None):
        return torch.full((len(completions),), float("nan"))

    with pytest.raises(TrainingError, match="iter 1 run 1 step 1: the reward is not finite"):
        train_tiny_warp(tmp_path, tiny_policy, config, reward=broken)


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


def test_a_checkpoint_past_the_runs_end_restarts_it_rather_than_save_a_longer_run(tiny_policy, tmp_path):
    """A run of 4 steps stopped after its step-2 checkpoint, resumed as a run of 1 step: the
    checkpoint is set aside, and the result is bitwise the clean 1-step run."""
    from tests.helpers import same_weights

    class Stop(Exception):
        pass

    def stop_at_3(spec, metrics):
        if metrics["step"] == 3:
            raise Stop

    config = tiny_config(tmp_path, checkpoint_every=2)
    folder = RunFolder(tmp_path / "cut")
    policy = load_causal_lm(str(tiny_policy))
    with pytest.raises(Stop):
        trainer = Trainer(config, policy, make_tokenizer(), good_fraction, PROMPTS, log_step=stop_at_3)
        train_run(trainer, RunSpec(1, 1, folder, 0.1), None, 4)
    assert (folder.checkpoint / "state.json").exists()
    train_run(Trainer(config, load_causal_lm(str(tiny_policy)), make_tokenizer(), good_fraction, PROMPTS),
              RunSpec(1, 1, folder, 0.1), None, 1)  # fmt: skip
    clean = RunFolder(tmp_path / "clean")
    train_run(Trainer(config, load_causal_lm(str(tiny_policy)), make_tokenizer(), good_fraction, PROMPTS),
              RunSpec(1, 1, clean, 0.1), None, 1)  # fmt: skip
    assert same_weights(folder.policy, clean.policy)
    assert (tmp_path / "cut" / "checkpoint.previous" / "state.json").exists()


@pytest.mark.parametrize(
    "overrides", [{}, {"baseline": "loo", "grad_accumulation_steps": 2}, {"lora_r": 2, "lora_dropout": 0.5}]
)
def test_a_step_leaves_the_global_rng_as_it_was(tiny_policy, tmp_path, overrides):
    """Sampling and LoRA's dropout draw from the step's own generator, never from the caller's RNG."""
    if "lora_r" in overrides:
        pytest.importorskip("peft", reason="LoRA needs the [lora] extra, which `make test` installs")
    config = tiny_config(tmp_path, **overrides)
    torch.manual_seed(5)
    state = torch.get_rng_state()
    trainer = Trainer(config, load_causal_lm(str(tiny_policy)), make_tokenizer(), good_fraction, PROMPTS)
    spec = RunSpec(1, 1, RunFolder(tmp_path), 0.1)
    optimizer, scheduler = new_optimizer(trainer.policy, config)
    trainer.start(spec, None)
    trainer.step(spec, 0, optimizer, scheduler)
    assert torch.equal(torch.get_rng_state(), state)


def test_each_step_writes_the_same_metrics_line(tiny_policy, tmp_path):
    import json

    config = tiny_config(tmp_path)
    folder = RunFolder(tmp_path / "run")
    train_run(Trainer(config, load_causal_lm(str(tiny_policy)), make_tokenizer(), good_fraction, PROMPTS),
              RunSpec(1, 1, folder, 0.1), None, 2)  # fmt: skip
    keys = ["step", "reward_mean", "reward_std", "kl_to_anchor", "reward_beta_mean", "loss", "grad_norm", "entropy",
            "completion_length", "learning_rate", "tokens", "completion_tokens", "seconds", "seconds_generate",
            "seconds_reward", "seconds_anchor", "seconds_policy", "seconds_optimizer", "seconds_ema"]  # fmt: skip
    rows = [json.loads(line) for line in folder.metrics.read_text().splitlines()]
    assert [list(row) for row in rows] == [keys, keys] and [row["step"] for row in rows] == [1, 2]


def test_a_checkpoint_made_with_a_relative_reward_file_resumes_from_the_absolute_one(tmp_path, monkeypatch):
    """A run started with `rewards.py:f` and resumed through the saved config (paths absolute) is the
    same run: its checkpoint is resumed, not set aside."""
    import json
    import types

    from warp_rlhf.algorithm.run_loop import _run_fields, _set_aside_if_changed
    from warp_rlhf.config import WarpConfig

    monkeypatch.chdir(tmp_path)
    (tmp_path / "rewards.py").write_text("def f(completions, **kwargs):\n    return [0.0] * len(completions)\n")
    checkpoint = tmp_path / "run" / "checkpoint"
    checkpoint.mkdir(parents=True)
    relative = types.SimpleNamespace(config=WarpConfig(reward_funcs=["rewards.py:f"]))
    fields = {name: getattr(relative.config, name) for name in _run_fields(relative)}  # as typed, relative
    (checkpoint / "state.json").write_text(json.dumps({"step": 2, "fields": fields}))
    absolute = types.SimpleNamespace(config=WarpConfig(reward_funcs=[f"{tmp_path / 'rewards.py'}:f"]))
    spec = RunSpec(1, 1, RunFolder(tmp_path / "run"), 0.01)
    _set_aside_if_changed(absolute, spec, checkpoint, steps=4)
    assert (checkpoint / "state.json").exists() and not checkpoint.with_name("checkpoint.previous").exists()
