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


def slerp_coefficients(norm_1: float, norm_2: float, dot: float, weight: float) -> tuple[float, float]:
    """(c1, c2) with SLERP(δ1, δ2; λ) = c1 δ1 + c2 δ2 (paper Eq. 3).

    cos Ω = ⟨δ1, δ2⟩ / (‖δ1‖ ‖δ2‖), clamped to [−1, 1]; c1 = sin((1 − λ)Ω) / sin Ω,
    c2 = sin(λΩ) / sin Ω. LERP's (1 − λ, λ) where a norm is zero, a value is not finite, or
    sin Ω < SIN_EPSILON (near-collinear), so the result is never NaN.
    """
    if norm_1 == 0.0 or norm_2 == 0.0 or not math.isfinite(dot * norm_1 * norm_2):
        return 1.0 - weight, weight
    omega = math.acos(max(-1.0, min(1.0, dot / (norm_1 * norm_2))))
    sin_omega = math.sin(omega)
    if sin_omega < SIN_EPSILON:
        return 1.0 - weight, weight
    return math.sin((1.0 - weight) * omega) / sin_omega, math.sin(weight * omega) / sin_omega


def slerp(delta_1: torch.Tensor, delta_2: torch.Tensor, weight: float) -> torch.Tensor:
    """Spherical interpolation of two task vectors, per tensor (flattened); λ = 0 gives δ1, λ = 1 gives δ2."""
    a, b = delta_1.reshape(-1).float(), delta_2.reshape(-1).float()
    c1, c2 = slerp_coefficients(a.norm().item(), b.norm().item(), torch.dot(a, b).item(), weight)
    return torch.add(delta_1 * c1, delta_2, alpha=c2)


def _weights(runs: int, weight: float | None) -> list[float]:
    """λ for merging run m into the running merge: λ for M = 2, else 1/2, 1/3, …, 1/M."""
    if runs == 2:
        return [0.5 if weight is None else weight]
    return [1.0 / m for m in range(2, runs + 1)]


def slerp_task_vectors(deltas: list[torch.Tensor], weight: float | None = None) -> torch.Tensor:
    """SLERP of M task vectors for one tensor.

    M = 1: the vector itself. M = 2: SLERP(δ1, δ2; λ). M > 2: s2 = SLERP(δ1, δ2; 1/2),
    s_m = SLERP(s_{m−1}, δ_m; 1/m) — the uniform iterative merge (weight must be 1/M or None).
    """
    merged = deltas[0]
    for delta, lam in zip(deltas[1:], _weights(len(deltas), weight), strict=False):
        merged = slerp(merged, delta, lam)
    return merged


@torch.no_grad()
def slerp_merge(
    init: State, load_run_tensor: Callable[[int, str], torch.Tensor], runs: int, weight: float | None
) -> State:
    """θ_slerp = θ_init + SLERP(θ_1 − θ_init, …, θ_M − θ_init), tensor by tensor (Alg. 1).

    `load_run_tensor(m, name)` returns run m's tensor `name`, so finished runs stay on disk and
    one tensor of each is in memory at a time. The two task vectors being merged live in one
    reused (2, n) buffer: one product gives their norms and dot product, and one `addmm` writes
    θ_init + c1 δ1 + c2 δ2 — the only new memory is the result. Merging full weights instead of
    task vectors would behave like LERP (paper Fig. 10c), so the init is always subtracted first.
    """
    size = max(t.numel() for t in init.values())
    buffers: dict[torch.dtype, torch.Tensor] = {}
    merged: State = {}
    for name, base in init.items():
        flat = base.reshape(-1)
        pair = buffers.setdefault(base.dtype, torch.empty(2, size, dtype=base.dtype, device=base.device))[
            :, : flat.numel()
        ]
        torch.sub(load_run_tensor(0, name).reshape(-1).to(pair), flat, out=pair[0])
        if runs == 1:
            merged[name] = (flat + pair[0]).reshape(base.shape)
            continue
        for m, lam in enumerate(_weights(runs, weight), start=1):
            torch.sub(load_run_tensor(m, name).reshape(-1).to(pair), flat, out=pair[1])
            gram = (pair.float() @ pair.float().T).tolist()
            c1, c2 = slerp_coefficients(math.sqrt(gram[0][0]), math.sqrt(gram[1][1]), gram[0][1], lam)
            if m < runs - 1:
                pair[0].mul_(c1).add_(pair[1], alpha=c2)
            else:
                coefficients = torch.tensor([[c1, c2]], dtype=base.dtype, device=base.device)
                merged[name] = torch.addmm(flat.unsqueeze(0), coefficients, pair).reshape(base.shape)
    return merged


def liti(init: State, merged: State, rate: float) -> State:
    """Linear interpolation towards initialisation: θ_init ← (1 − η) θ_init + η θ_slerp (Alg. 1)."""
    return {name: lerp(init[name], merged[name], rate) for name in init}
