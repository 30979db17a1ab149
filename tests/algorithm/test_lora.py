"""LoRA under WARP: adapters alone train, and the task vector, the EMA anchor, SLERP and LITI act on
the merged weights W + (α/r)·B·A, by hand."""

import pytest
import torch

from tests.helpers import PROMPTS, NoSchedule, good_fraction, hand_slerp, make_tokenizer, tiny_config, train_tiny_warp
from warp_rlhf.algorithm import lora
from warp_rlhf.algorithm.merge import model_state
from warp_rlhf.algorithm.reinforce import RunSpec, Trainer, new_optimizer
from warp_rlhf.layout import RunFolder
from warp_rlhf.stages.models import load_causal_lm

pytest.importorskip("peft", reason="LoRA needs the [lora] extra, which `make test` installs")


def lora_config(tmp_path, **overrides):
    return tiny_config(tmp_path, lora_r=4, lora_alpha=8.0, learning_rate=3e-2, **overrides)


def by_hand(trainer: Trainer) -> dict[str, torch.Tensor]:
    """W + (α/r)·B·A for every adapted weight, from the adapter's parameters."""
    merged = {}
    for name, module in lora.adapted(trainer.policy).items():
        a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
        merged[f"{name}.weight"] = module.base_layer.weight + (8.0 / 4) * b @ a
    return merged


def test_only_the_adapters_train_and_adam_keeps_states_for_them_alone(tiny_policy, tmp_path):
    policy = load_causal_lm(str(tiny_policy))
    trainer = Trainer(lora_config(tmp_path), policy, make_tokenizer(), good_fraction, PROMPTS)
    trained = {n for n, p in trainer.policy.named_parameters() if p.requires_grad}
    assert trained and all(".lora_A." in n or ".lora_B." in n for n in trained)
    optimizer, _ = new_optimizer(trainer.policy, trainer.config)
    assert (
        len(optimizer.state) == len(trained) and sum(p.numel() for p in optimizer.state) < policy.num_parameters() / 3
    )
    assert not any(".lora_" in name for name, _ in policy.named_parameters()), "the caller's model stays plain"


def test_a_steps_merged_weights_are_the_full_weights_with_the_same_delta(tiny_policy, tmp_path):
    """After a step, the run's weights are W + (α/r)·B·A, and a plain model with them computes
    exactly what the adapted model does."""
    trainer = Trainer(lora_config(tmp_path), load_causal_lm(str(tiny_policy)), make_tokenizer(), good_fraction, PROMPTS)
    spec = RunSpec(1, 1, RunFolder(tmp_path / "run"), 0.1)
    optimizer, scheduler = new_optimizer(trainer.policy, trainer.config)
    trainer.start(spec, None)
    trainer.step(spec, 0, optimizer, scheduler)
    merged = trainer.weights()
    for name, expected in by_hand(trainer).items():
        assert torch.allclose(merged[name], expected, atol=1e-6), name
    moved = [n for n, t in by_hand(trainer).items() if not torch.allclose(t, trainer.anchor_state[n], atol=0)]
    assert moved, "the step changed the merged weights"
    plain = load_causal_lm(str(tiny_policy))
    plain.load_state_dict({**plain.state_dict(), **merged}, strict=True)
    ids = torch.tensor([[4, 5, 7, 16, 10]])
    with torch.no_grad():
        assert torch.allclose(plain(ids).logits, trainer.policy(ids).logits, atol=1e-5)


class CapturedGradients:
    """Optimiser stand-in that keeps the adapters' gradients and changes nothing."""

    def __init__(self, model):
        self.model, self.param_groups, self.grads = model, [{"lr": 0.0}], {}

    def step(self):
        self.grads = {n: p.grad.clone() for n, p in self.model.named_parameters() if p.grad is not None}

    def zero_grad(self, set_to_none=True):
        self.model.zero_grad(set_to_none=set_to_none)


def test_micro_batches_give_a_lora_step_the_gradient_of_the_whole_batch(tiny_policy, tmp_path):
    grads = []
    for accumulation in (1, 2):
        config = lora_config(tmp_path, grad_accumulation_steps=accumulation, baseline="loo")
        trainer = Trainer(config, load_causal_lm(str(tiny_policy)), make_tokenizer(), good_fraction, PROMPTS)
        spec = RunSpec(1, 1, RunFolder(tmp_path / "run"), 0.1)
        trainer.start(spec, None)
        optimizer = CapturedGradients(trainer.policy)
        trainer.step(spec, 0, optimizer, NoSchedule())
        grads.append(optimizer.grads)
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name, grad in grads[0].items():
        assert torch.allclose(grads[1][name], grad, atol=1e-6), name


def test_a_lora_run_with_dropout_resumed_in_a_new_process_ends_bitwise_where_it_would_have(
    tiny_policy, tmp_path, monkeypatch
):
    """LoRA's dropout draws from each step's seed alone, whatever a process checks once per model
    or class before a resumed run's first step (the fast paths' verdicts, the RMSNorm check)."""
    from tests.helpers import same_weights
    from warp_rlhf.algorithm.run_loop import train_run
    from warp_rlhf.cpu import activations

    class Stop(Exception):
        pass

    def stop_after_step_3(spec, metrics):
        if metrics["step"] == 3:
            raise Stop

    def run(folder, log_step=None):
        monkeypatch.setattr(activations, "_RMS_NORM_CLASSES", {})  # as in a process of its own
        trainer = Trainer(config, load_causal_lm(str(tiny_policy)), make_tokenizer(), good_fraction, PROMPTS, log_step)
        train_run(trainer, RunSpec(1, 1, folder, 0.1), None, 4)

    config = lora_config(tmp_path, lora_dropout=0.5, checkpoint_every=1)
    run(RunFolder(tmp_path / "clean"))
    with pytest.raises(Stop):
        run(RunFolder(tmp_path / "cut"), stop_after_step_3)
    run(RunFolder(tmp_path / "cut"))  # from its step-2 checkpoint
    assert same_weights(RunFolder(tmp_path / "cut").policy, RunFolder(tmp_path / "clean").policy)


def test_the_anchor_is_the_ema_of_the_merged_weights(tiny_policy, tmp_path):
    """θ_ema ← (1 − μ) θ_ema + μ W' after every step, on W' = W + (α/r)·B·A: by hand over three steps."""
    mu = 0.3
    trainer = Trainer(lora_config(tmp_path), load_causal_lm(str(tiny_policy)), make_tokenizer(), good_fraction, PROMPTS)
    spec = RunSpec(1, 1, RunFolder(tmp_path / "run"), mu)
    optimizer, scheduler = new_optimizer(trainer.policy, trainer.config)
    trainer.start(spec, None)
    expected = {name: trainer.anchor_state[name].clone() for name in by_hand(trainer)}
    for step in range(3):
        trainer.step(spec, step, optimizer, NoSchedule())
        for name, merged in by_hand(trainer).items():
            expected[name] = (1 - mu) * expected[name] + mu * merged.detach()
    for name, value in expected.items():
        assert torch.allclose(trainer.anchor_state[name], value, atol=1e-6), name


def test_warp_with_lora_merges_and_interpolates_the_merged_weights(tiny_policy, tmp_path):
    from safetensors.torch import load_file

    config = lora_config(tmp_path, liti_rate=0.3, steps=2)
    (final, _), _ = train_tiny_warp(tmp_path, tiny_policy, config)
    sft = {k: v.clone() for k, v in model_state(load_causal_lm(str(tiny_policy))).items()}
    runs = [load_file(tmp_path / "iter_1" / f"run_{m}" / "policy.safetensors") for m in (1, 2)]
    assert runs[0].keys() == sft.keys(), "a run's output holds the plain model's names: merged weights"
    slerp_1 = load_file(tmp_path / "iter_1" / "slerp.safetensors")
    init_2 = load_file(tmp_path / "iter_2" / "init.safetensors")
    for name in sft:
        expected = sft[name] + hand_slerp(runs[0][name] - sft[name], runs[1][name] - sft[name], 0.5)
        assert torch.allclose(slerp_1[name], expected, atol=1e-5), name
        assert torch.allclose(init_2[name], 0.7 * sft[name] + 0.3 * slerp_1[name], atol=1e-6), name  # LITI
    changed = [n for n in sft if not torch.equal(runs[0][n], sft[n])]
    assert changed and all(n.endswith("proj.weight") for n in changed), "only adapted weights move"


def test_the_cpu_fast_paths_handle_lora_layers_or_step_aside(tiny_policy, tmp_path):
    from warp_rlhf import cpu, policy
    from warp_rlhf.policy import logprobs as scoring

    trainer = Trainer(lora_config(tmp_path), load_causal_lm(str(tiny_policy)), make_tokenizer(), good_fraction, PROMPTS)
    model = trainer.policy
    for module in lora.adapted(model).values():  # a non-zero update, so the adapters matter
        torch.nn.init.normal_(module.lora_B["default"].weight, std=0.1)
    assert not cpu.decodes_exactly(model), "the written-out decode step does not know LoRA layers"
    torch.manual_seed(0)
    batch = policy.sample(model, make_tokenizer(), ["the movie", "a film was"], temperature=1.0, max_new_tokens=4)
    fast, _ = scoring.completion_logprobs(model, batch, 1.0)
    plain = scoring.padded_logits(model, batch).log_softmax(-1).gather(-1, batch.completion_ids[..., None])[..., 0]
    assert torch.allclose(fast, plain, atol=1e-5)
    fast.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    plain = scoring.padded_logits(model, batch).log_softmax(-1).gather(-1, batch.completion_ids[..., None])[..., 0]
    plain.sum().backward()
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            assert torch.allclose(parameter.grad, grads[name], atol=1e-5), name


def test_lora_on_gpt2_conv1d_layers_merges_in_their_layout(tmp_path):
    """GPT-2 stores its projections transposed (Conv1D): ΔW follows that layout, and a plain model
    with the merged weights computes what the adapted one does."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from warp_rlhf.algorithm.lora import adapted, add_adapters, merged_state

    torch.manual_seed(0)
    plain = GPT2LMHeadModel(GPT2Config(vocab_size=40, n_positions=32, n_embd=16, n_layer=1, n_head=2)).eval()
    model = add_adapters(__import__("copy").deepcopy(plain), lora_config(tmp_path))
    for module in adapted(model).values():
        torch.nn.init.normal_(module.lora_B["default"].weight, std=0.2)
    merged = merged_state(model)
    assert merged["transformer.h.0.attn.c_attn.weight"].shape == (16, 48)  # Conv1D: (in, out)
    plain.load_state_dict({**plain.state_dict(), **merged}, strict=True)
    ids = torch.tensor([[1, 5, 7, 3]])
    with torch.no_grad():
        assert torch.allclose(plain(ids).logits, model(ids).logits, atol=1e-5)
