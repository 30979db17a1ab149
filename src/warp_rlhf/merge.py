"""Weight-space operations of WARP as pure tensor functions (paper §3, Algorithm 1).

A *state* is a dict name → tensor holding each float tensor of a model once (tied weights
appear under one name). Non-float tensors (integer position ids, boolean masks) are never
merged: they are copied from θ_init.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

State = dict[str, torch.Tensor]

SIN_EPSILON = 1e-6
"""Below this sin Ω the two task vectors are taken as collinear and SLERP falls back to LERP."""


def model_state(model: torch.nn.Module) -> State:
    """The model's float tensors by name, each storage once (views of the model's memory)."""
    seen: set[tuple] = set()
    state: State = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        tensor = tensor.data
        if not tensor.is_floating_point():
            continue
        key = (tensor.data_ptr(), tuple(tensor.shape))
        if tensor.numel() and key in seen:
            continue  # tied weight: merged once under its first name
        seen.add(key)
        state[name] = tensor
    return state


@torch.no_grad()
def copy_into(model: torch.nn.Module, state: State) -> None:
    """Write `state` into the model's tensors in place (tied weights follow)."""
    targets = model_state(model)
    if targets.keys() != state.keys():
        missing, extra = targets.keys() - state.keys(), state.keys() - targets.keys()
        raise KeyError(f"state does not match the model (missing {sorted(missing)[:3]}, extra {sorted(extra)[:3]})")
    torch._foreach_copy_(list(targets.values()), [state[name] for name in targets])


@torch.no_grad()
def ema_update_(ema: Iterable[torch.Tensor], online: Iterable[torch.Tensor], rate: float) -> None:
    """θ_ema ← (1 − μ) θ_ema + μ θ, in place for every tensor, fused (Alg. 1, EMA anchor)."""
    torch._foreach_lerp_(list(ema), list(online), rate)


def lerp(a: torch.Tensor, b: torch.Tensor, weight: float) -> torch.Tensor:
    """(1 − λ) a + λ b."""
    return torch.lerp(a, b, weight)


def slerp(delta_1: torch.Tensor, delta_2: torch.Tensor, weight: float) -> torch.Tensor:
    """Spherical interpolation of two task vectors (paper Eq. 3, per tensor, flattened).

    cos Ω = ⟨δ1, δ2⟩ / (‖δ1‖ ‖δ2‖), clamped to [−1, 1];
    SLERP(δ1, δ2; λ) = sin((1 − λ)Ω) / sin Ω · δ1 + sin(λΩ) / sin Ω · δ2.
    Falls back to LERP where a norm is zero or sin Ω < SIN_EPSILON (near-collinear), so the
    result is never NaN. λ = 0 gives δ1 and λ = 1 gives δ2.
    """
    a, b = delta_1.reshape(-1), delta_2.reshape(-1)
    dot = torch.dot(a.float(), b.float()).item()
    norm_1, norm_2 = a.float().norm().item(), b.float().norm().item()
    if norm_1 == 0.0 or norm_2 == 0.0 or not math.isfinite(dot):
        return lerp(delta_1, delta_2, weight)
    cos_omega = max(-1.0, min(1.0, dot / (norm_1 * norm_2)))
    omega = math.acos(cos_omega)
    sin_omega = math.sin(omega)
    if sin_omega < SIN_EPSILON:
        return lerp(delta_1, delta_2, weight)
    coef_1 = math.sin((1.0 - weight) * omega) / sin_omega
    coef_2 = math.sin(weight * omega) / sin_omega
    return torch.add(delta_1 * coef_1, delta_2, alpha=coef_2)


def slerp_task_vectors(deltas: list[torch.Tensor], weight: float | None = None) -> torch.Tensor:
    """SLERP of M task vectors for one tensor.

    M = 1: the vector itself. M = 2: SLERP(δ1, δ2; λ). M > 2: s2 = SLERP(δ1, δ2; 1/2),
    s_m = SLERP(s_{m−1}, δ_m; 1/m) — the uniform iterative merge (weight must be 1/M or None).
    """
    if len(deltas) == 1:
        return deltas[0]
    if len(deltas) == 2:
        return slerp(deltas[0], deltas[1], 0.5 if weight is None else weight)
    merged = slerp(deltas[0], deltas[1], 0.5)
    for m, delta in enumerate(deltas[2:], start=3):
        merged = slerp(merged, delta, 1.0 / m)
    return merged


def slerp_merge(
    init: State, load_run_tensor: Callable[[int, str], torch.Tensor], runs: int, weight: float | None
) -> State:
    """θ_slerp = θ_init + SLERP(θ_1 − θ_init, …, θ_M − θ_init), tensor by tensor (Alg. 1).

    `load_run_tensor(m, name)` returns run m's tensor `name`, so finished runs can stay on
    disk and only one tensor of each is in memory at a time. Merging full weights instead of
    task vectors behaves like LERP (paper Fig. 10c), so the init is always subtracted first.
    """
    merged: State = {}
    for name, base in init.items():
        deltas = [load_run_tensor(m, name).to(base.dtype) - base for m in range(runs)]
        merged[name] = base + slerp_task_vectors(deltas, weight)
    return merged


def liti(init: State, merged: State, rate: float) -> State:
    """Linear interpolation towards initialisation: θ_init ← (1 − η) θ_init + η θ_slerp (Alg. 1)."""
    return {name: lerp(init[name], merged[name], rate) for name in init}
