"""precision: bf16 on a CPU (CPU autocast): a tiny step within stated tolerances of fp32, the fast
paths that multiply in fp32 stepping aside, and fp32 master weights, moments and EMA anchor, which
keep an anchor update that bf16 would round away."""

import pytest
import torch

from tests.helpers import PROMPTS, CapturingSGD, NoSchedule, good_fraction, make_tokenizer, tiny_config
from warp_rlhf.algorithm.reinforce import PhaseClock, RunSpec, Trainer, autocast, new_optimizer
from warp_rlhf.cpu.gemm import runs_on_onednn
from warp_rlhf.layout import RunFolder
from warp_rlhf.stages.models import load_causal_lm

GRADIENT_TOLERANCE = 2e-2
"""bf16's gradient against fp32's on the same samples: ‖g_bf16 − g_fp32‖ ≤ this · ‖g_fp32‖ (bf16
keeps 8 significant bits, a relative rounding of 2⁻⁸ ≈ 4e-3 per product)."""
KL_TOLERANCE, REWARD_TOLERANCE = 1e-2, 1e-2
"""The first step's mean KL to the anchor and mean reward, bf16 against fp32 (absolute)."""


def _trainer(tiny_policy, tmp_path, precision: str, **overrides) -> tuple[Trainer, RunSpec]:
    config = tiny_config(tmp_path, batch_size=8, beta=0.5, precision=precision, **overrides)
    trainer = Trainer(config, load_causal_lm(str(tiny_policy)), make_tokenizer(), good_fraction, PROMPTS)
    with torch.no_grad():  # an anchor apart from the policy, so that the KL term is not zero
        for tensor in trainer.anchor_state.values():
            tensor.add_(0.05 * torch.randn(tensor.shape, generator=torch.Generator().manual_seed(1)))
    return trainer, RunSpec(1, 1, RunFolder(tmp_path), config.ema_rate)


def test_cpu_autocast_sets_the_fp32_onednn_paths_aside(tmp_path):
    x, weight = torch.randn(2, 4), torch.randn(3, 4)
    assert runs_on_onednn(x, weight) or not torch.backends.mkldnn.is_available()
    with autocast(tiny_config(tmp_path, precision="bf16"), torch.device("cpu")):
        assert torch.is_autocast_enabled("cpu") and not runs_on_onednn(x, weight)
        assert torch.nn.functional.linear(x, weight).dtype == torch.bfloat16


def test_a_bf16_step_on_cpu_stays_within_its_tolerances_of_fp32(tiny_policy, tmp_path):
    """The same samples (collected in fp32) through bf16's and fp32's update: the gradient; a first
    step of each from the same seed: its reward and KL."""
    fp32, spec = _trainer(tiny_policy, tmp_path / "fp32", "fp32")
    bf16, _ = _trainer(tiny_policy, tmp_path / "bf16", "bf16")
    trajectory = fp32.collect(spec, 0, PhaseClock(fp32.device), torch.Generator().manual_seed(0))
    grads = {}
    for name, trainer in (("fp32", fp32), ("bf16", bf16)):
        optimizer = CapturingSGD(trainer.policy, lr=0.0)
        trainer.update(trajectory, optimizer, NoSchedule(), 0.0, PhaseClock(trainer.device), "x", torch.Generator())
        grads[name] = optimizer.grads
    error = sum((grads["bf16"][k] - g).square().sum() for k, g in grads["fp32"].items()).sqrt()
    norm = sum(g.square().sum() for g in grads["fp32"].values()).sqrt()
    assert 0 < error <= GRADIENT_TOLERANCE * norm  # bf16 did compute in bf16, and close to fp32

    first = {}
    for name, trainer in (("fp32", fp32), ("bf16", bf16)):
        optimizer, scheduler = new_optimizer(trainer.policy, trainer.config)
        first[name] = trainer.step(spec, 0, optimizer, scheduler)
    assert abs(first["bf16"].reward_mean - first["fp32"].reward_mean) <= REWARD_TOLERANCE
    assert abs(first["bf16"].kl_to_anchor - first["fp32"].kl_to_anchor) <= KL_TOLERANCE


@pytest.mark.parametrize("lora_r", [0, 2])
def test_bf16_keeps_fp32_weights_moments_and_an_ema_update_bf16_would_round_away(tiny_policy, tmp_path, lora_r):
    """θ_ema = 1 and θ = 1 + 1e-2 everywhere, μ = 0.01: the anchor moves by μ·Δ = 1e-4, below bf16's
    spacing at 1 (2⁻⁷), and still moves, exactly as in fp32."""
    if lora_r:
        pytest.importorskip("peft", reason="LoRA needs the [lora] extra, which `make test` installs")
    trainer, spec = _trainer(tiny_policy, tmp_path, "bf16", lora_r=lora_r)
    with torch.no_grad():
        for tensor in trainer.anchor_state.values():
            tensor.fill_(1.0)
        for name, tensor in trainer.policy_state.items():  # LoRA's fresh B = 0: W' = W
            if ".lora_" not in name:
                tensor.fill_(1.0 + 1e-2)
    rate, delta = 0.01, 1e-2
    assert torch.tensor(1.0, dtype=torch.bfloat16) + rate * delta == 1.0  # bf16 rounds the update away
    trajectory = trainer.collect(spec, 0, PhaseClock(trainer.device), torch.Generator().manual_seed(0))
    frozen = CapturingSGD(trainer.policy, lr=0.0)  # θ stays where it is
    trainer.update(trajectory, frozen, NoSchedule(), rate, PhaseClock(trainer.device), "x", torch.Generator())
    expected = torch.tensor(1.0) * (1 - rate) + rate * torch.tensor(1.0 + delta)
    adapted = [name for name in trainer.anchor_state if lora_r == 0 or "proj" in name]  # LoRA: the others stay
    assert adapted and expected != 1.0
    for name in adapted:
        assert torch.all(trainer.anchor_state[name] == expected), name

    optimizer, scheduler = new_optimizer(trainer.policy, trainer.config)
    trainer.step(spec, 1, optimizer, scheduler)
    assert all(p.dtype == torch.float32 for p in trainer.policy.parameters())
    assert all(t.dtype == torch.float32 for t in trainer.anchor_state.values())
    assert all(t.dtype == torch.float32 for state in optimizer.state.values() for t in state.values())
