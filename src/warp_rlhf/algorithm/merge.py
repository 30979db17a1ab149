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
"""Below this sin Ω two task vectors are collinear and SLERP falls back to LERP. The Gram matrix
is exact to about 1e-16 relative (float64 products of fp32 numbers), which resolves sin Ω down to
about 1e-8: the threshold sits well above what rounding can produce."""

ZERO_NORM = 1e-6
"""A task vector whose norm is at most this fraction of the magnitudes it is compared with (the
other vector, and the vectors it was summed from) is zero: its direction is rounding, so SLERP
falls back to LERP rather than follow it."""


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


def slerp_coefficients(
    norm_1: float, norm_2: float, dot: float, weight: float, *, scale: float | None = None
) -> tuple[float, float]:
    """(c1, c2) with SLERP(δ1, δ2; λ) = c1 δ1 + c2 δ2 (paper Eq. 3), from float64 norms and dot.

    cos Ω = ⟨δ1, δ2⟩ / (‖δ1‖ ‖δ2‖), clamped to [−1, 1]; c1 = sin((1 − λ)Ω) / sin Ω,
    c2 = sin(λΩ) / sin Ω. LERP's (1 − λ, λ) where a vector is zero (`ZERO_NORM` of `scale`,
    by default the larger norm), a value is not finite, or sin Ω < `SIN_EPSILON` (collinear,
    antipodal, or any two 1-element tensors), so the result is never NaN.
    """
    scale = max(norm_1, norm_2) if scale is None else max(scale, norm_1, norm_2)
    if not math.isfinite(dot * norm_1 * norm_2) or min(norm_1, norm_2) <= ZERO_NORM * scale:
        return 1.0 - weight, weight
    omega = math.acos(max(-1.0, min(1.0, dot / (norm_1 * norm_2))))
    sin_omega = math.sin(omega)
    if sin_omega < SIN_EPSILON:
        return 1.0 - weight, weight
    return math.sin((1.0 - weight) * omega) / sin_omega, math.sin(weight * omega) / sin_omega


def slerp(delta_1: torch.Tensor, delta_2: torch.Tensor, weight: float) -> torch.Tensor:
    """Spherical interpolation of two task vectors, per tensor (flattened); λ = 0 gives δ1, λ = 1 gives δ2."""
    a, b = delta_1.reshape(-1).double(), delta_2.reshape(-1).double()
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


def slerp_weights(gram: list[list[float]], weight: float | None) -> list[float]:
    """The iterative SLERP of M task vectors as weights w with SLERP(δ_1..δ_M) = Σ_m w_m δ_m.

    Every SLERP is a linear combination of its two inputs (Eq. 3), so the running merge
    s = Σ w_m δ_m never needs materialising: ‖s‖² = wᵀGw and ⟨s, δ_m⟩ = (Gw)_m follow from
    the Gram matrix G_ij = ⟨δ_i, δ_j⟩ of the task vectors. s is judged zero against Σ |w_i| ‖δ_i‖,
    the size of what it was summed from: two runs that cancel leave a zero, not a direction of
    rounding that the next run would be turned towards.
    """
    return _iterate(gram, weight)[0]


def _iterate(gram: list[list[float]], weight: float | None) -> tuple[list[float], float]:
    """(the weights of `slerp_weights`, the closest any step came to a LERP fallback: the
    smallest of sin Ω and the ratios of a norm to its scale)."""
    runs = len(gram)
    norms = [math.sqrt(max(0.0, gram[i][i])) for i in range(runs)]
    w, closest = [1.0] + [0.0] * (runs - 1), math.inf
    for m, lam in enumerate(_weights(runs, weight), start=1):
        g_w = [sum(gram[i][j] * w[j] for j in range(runs)) for i in range(runs)]
        norm_s = math.sqrt(max(0.0, sum(w[i] * g_w[i] for i in range(runs))))
        scale = max(sum(abs(w[i]) * norms[i] for i in range(runs)), norms[m])
        if norm_s > 0 and norms[m] > 0:
            cos = max(-1.0, min(1.0, g_w[m] / (norm_s * norms[m])))
            closest = min(closest, math.sqrt(1 - cos * cos), norm_s / scale, norms[m] / scale)
        else:
            closest = 0.0
        c1, c2 = slerp_coefficients(norm_s, norms[m], g_w[m], lam, scale=scale)
        w = [c1 * x for x in w]
        w[m] += c2
    return w, closest


def lerp_weights(runs: int, weight: float | None) -> list[float]:
    """LERP of task vectors, their weighted average: (1 − λ, λ) for M = 2, else 1/M each."""
    if runs == 2 and weight is not None:
        return [1.0 - weight, weight]
    return [1.0 / runs] * runs


def _task_vectors(
    finals: list[torch.Tensor], flat: torch.Tensor, buffer: torch.Tensor, start: int, stop: int
) -> torch.Tensor:
    """θ_m − θ_init on elements start..stop-1 of every run, written into rows of `buffer`."""
    piece = buffer[:, : stop - start]
    for m, final in enumerate(finals):
        torch.sub(final[start:stop], flat[start:stop], out=piece[m])
    return piece


MERGE_CHUNK = 1 << 20
"""Elements per piece of a tensor: M pieces of task vectors (4 MiB each) stay in the CPU cache."""

DELICATE = 1e-3
"""Within this of a fallback (sin Ω or a norm ratio), fp32 dot products (relative error up to
about 1e-6) could decide SLERP against LERP: the Gram matrix is then taken again from float64
products. Task vectors of real runs are far from it; 1-element tensors, antipodal and cancelling
runs are not."""


@torch.no_grad()
def merge_task_vectors(
    init: State,
    load_run_tensor: Callable[[int, str], torch.Tensor],
    runs: int,
    weight: float | None,
    method: str = "slerp",
    chunk: int = MERGE_CHUNK,
) -> State:
    """θ_init + SLERP(θ_1 − θ_init, …, θ_M − θ_init), tensor by tensor (Alg. 1), or with
    `method="lerp"` θ_init + the weighted average of the task vectors (`lerp_weights`).

    `load_run_tensor(m, name)` returns run m's tensor `name`, so finished runs stay on disk and
    one tensor of each is in memory at a time. Two passes over each tensor, in cache-sized
    pieces: the first accumulates the task vectors' Gram matrix over pieces in float64 (`_gram`;
    the products too where the merge comes near a fallback, `DELICATE`), which gives the SLERP
    weights (`slerp_weights`); the second writes θ_init + Σ_m w_m δ_m. A tensor that fits
    in one piece keeps its task vectors from the first pass; a larger one recomputes them rather
    than writing and re-reading full-size differences. The only new memory is the result.
    Merging full weights instead of task vectors would behave like LERP (paper Fig. 10c), so the
    init is always subtracted first.
    """
    if method not in {"slerp", "lerp"}:
        raise ValueError(f"merge method {method!r} is not slerp or lerp")
    buffers: dict[torch.dtype, torch.Tensor] = {}
    merged: State = {}
    for name, base in init.items():
        flat = base.reshape(-1)
        finals = [load_run_tensor(m, name).reshape(-1).to(flat) for m in range(runs)]
        if base.dtype not in buffers:
            buffers[base.dtype] = torch.empty(runs, chunk, dtype=base.dtype, device=base.device)
        buffer = buffers[base.dtype]
        pieces = range(0, flat.numel(), chunk)
        kept = method == "slerp" and len(pieces) == 1  # the first pass leaves the task vectors in `buffer`
        if method == "lerp":
            w = lerp_weights(runs, weight)
        else:
            gram = _gram(finals, flat, buffer, chunk, exact=False)
            w, closest = _iterate(gram, weight)
            if closest < DELICATE and any(gram[m][m] > 0 for m in range(runs)):  # all zero (a frozen tensor): exact
                w = slerp_weights(_gram(finals, flat, buffer, chunk, exact=True), weight)
        result = torch.empty_like(flat)
        for start in pieces:
            stop = min(flat.numel(), start + chunk)
            piece = buffer[:, : stop - start] if kept else _task_vectors(finals, flat, buffer, start, stop)
            torch.add(flat[start:stop], piece[0], alpha=w[0], out=result[start:stop])
            for m in range(1, runs):
                result[start:stop].add_(piece[m], alpha=w[m])
        merged[name] = result.reshape(base.shape)
    return merged


def _gram(
    finals: list[torch.Tensor], flat: torch.Tensor, buffer: torch.Tensor, chunk: int, *, exact: bool
) -> list[list[float]]:
    """G_ij = ⟨δ_i, δ_j⟩, summed over pieces in float64; with `exact`, each piece's products too
    (fp32 numbers multiply exactly in float64, so two 1-element or antipodal task vectors give
    |cos Ω| = 1 up to 1e-16). Leaves the last piece's task vectors in `buffer`."""
    runs, gram = len(finals), [[0.0] * len(finals) for _ in finals]
    for start in range(0, flat.numel(), chunk):
        piece = _task_vectors(finals, flat, buffer, start, min(flat.numel(), start + chunk))
        rows = piece.double() if exact else piece
        for i in range(runs):
            for j in range(i, runs):
                gram[i][j] += torch.dot(rows[i], rows[j]).item()
                gram[j][i] = gram[i][j]
    return gram


def liti(init: State, merged: State, rate: float) -> State:
    """Linear interpolation towards initialisation: θ_init ← (1 − η) θ_init + η θ_slerp (Alg. 1)."""
    return {name: lerp(init[name], merged[name], rate) for name in init}
