"""Gradient checkpointing: the layers are recomputed in the backward pass, and the gradients are
bitwise those without it (full, LoRA with its dropout, micro-batches), whatever fast paths ran."""

import pytest
import torch

from tests.helpers import PROMPTS, CapturingSGD, NoSchedule, good_fraction, make_tokenizer, tiny_config
from warp_rlhf.algorithm.reinforce import RunSpec, Trainer
from warp_rlhf.layout import RunFolder
from warp_rlhf.policy.checkpointing import checkpointed, decoder_layers
from warp_rlhf.stages.models import load_causal_lm


def _step(tiny_policy, tmp_path, **overrides):
    """The gradients and metrics of a first step, and how many times a decoder layer ran with a gradient."""
    config = tiny_config(tmp_path, batch_size=8, **overrides)
    trainer = Trainer(config, load_causal_lm(str(tiny_policy)), make_tokenizer(), good_fraction, PROMPTS)
    spec = RunSpec(1, 1, RunFolder(tmp_path), config.ema_rate)
    trainer.start(spec, None)
    layer_type = type(decoder_layers(trainer.policy)[0])
    forward, calls = layer_type.forward, []

    def counting(self, *args, **kwargs):
        calls.append(torch.is_grad_enabled())
        return forward(self, *args, **kwargs)

    optimizer = CapturingSGD(trainer.policy, lr=0.0)
    layer_type.forward = counting
    try:
        metrics = trainer.step(spec, 0, optimizer, NoSchedule())
    finally:
        layer_type.forward = forward
    return optimizer.grads, metrics, sum(calls)


@pytest.mark.parametrize(
    "overrides",
    [{}, {"grad_accumulation_steps": 2, "baseline": "loo"}, {"lora_r": 2, "lora_dropout": 0.5}],
    ids=["full", "micro-batches", "lora-dropout"],
)
def test_checkpointing_recomputes_the_layers_and_gives_bitwise_the_same_gradients(tiny_policy, tmp_path, overrides):
    if "lora_r" in overrides:
        pytest.importorskip("peft", reason="LoRA needs the [lora] extra, which `make test` installs")
    plain, plain_metrics, plain_calls = _step(tiny_policy, tmp_path / "plain", **overrides)
    checked, checked_metrics, checked_calls = _step(tiny_policy, tmp_path / "ckpt", gradient_checkpointing=True,
                                                    **overrides)  # fmt: skip
    layers = 2 * overrides.get("grad_accumulation_steps", 1)  # two layers per training forward
    assert checked_calls == plain_calls + layers  # each layer once more, in the backward pass
    assert plain.keys() == checked.keys() and plain
    for name, grad in plain.items():
        assert torch.equal(checked[name], grad), name
    assert checked_metrics.loss == plain_metrics.loss and checked_metrics.entropy == plain_metrics.entropy


def test_outside_the_context_and_without_a_gradient_the_layers_run_as_they_are(tiny_policy):
    model = load_causal_lm(str(tiny_policy))
    ids = torch.tensor([[4, 5, 6, 7]])
    with checkpointed(model):
        assert all("forward" in vars(layer) for layer in decoder_layers(model))
        with torch.no_grad():
            inside = model(input_ids=ids).logits
    assert not any("forward" in vars(layer) for layer in decoder_layers(model))
    assert torch.equal(inside, model(input_ids=ids).logits.detach())
    with checkpointed(model, enabled=False):
        assert not any("forward" in vars(layer) for layer in decoder_layers(model))
