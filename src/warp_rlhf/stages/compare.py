"""Reward at matched KL: is curve A above curve B, by how much, with what standard error?

A curve is a LITI front (a policy interpolated towards the SFT policy) or a trajectory (one run's
checkpoints): evaluated points of (KL to the SFT policy, reward), each a mean over the same
held-out prompts. Each curve is interpolated piecewise linearly in KL, never extrapolated, and
A − B is read at KL values inside both ranges.

Two standard errors:
- from the points' own standard errors (`Point.reward_se`, `Point.kl_se`), propagated through the
  interpolation to first order, the curves taken as independent;
- with the per-prompt values (`Point.rewards`, `Point.kls`), a paired bootstrap over prompts:
  every policy was sampled on the same prompts with the same seeds, so a prompt's values move
  together across policies, and resampling prompts keeps that pairing. This one is reported when
  the values are there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class Point:
    """One evaluated policy: mean KL and reward with their standard errors, and optionally the
    per-prompt values they are means of (the same prompts, in the same order, for every point)."""

    kl: float
    reward: float
    kl_se: float = 0.0
    reward_se: float = 0.0
    kls: list[float] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)


@dataclass
class Difference:
    """reward_A(k) − reward_B(k) at KL k, and its standard error."""

    kl: float
    difference: float
    se: float

    @property
    def z(self) -> float:
        if self.se > 0:
            return self.difference / self.se
        return 0.0 if self.difference == 0 else math.copysign(math.inf, self.difference)


def mean_and_se(values: list[float]) -> tuple[float, float]:
    """Sample mean and its standard error std(ddof=1)/sqrt(n) (0 for n < 2)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(variance / n)


def interpolate(curve: list[Point], kl: float) -> tuple[float, float]:
    """(reward, standard error) of the curve at `kl`, linear between the two points around it.

    The curve's points are sorted by KL; `kl` must lie within their range. The error propagates
    the two points' reward and KL errors to first order: with t the position between them and s
    the slope, var = (1 − t)² (σ_r1² + s² σ_k1²) + t² (σ_r2² + s² σ_k2²).
    """
    points = sorted(curve, key=lambda p: p.kl)
    if not points or not points[0].kl <= kl <= points[-1].kl:
        raise ValueError(f"KL {kl} is outside the curve's range")
    for left, right in zip(points, points[1:], strict=False):
        if left.kl <= kl <= right.kl:
            break
    else:
        return points[0].reward, points[0].reward_se
    width = right.kl - left.kl
    if width <= 0:
        return left.reward, left.reward_se
    t = (kl - left.kl) / width
    slope = (right.reward - left.reward) / width
    variance = (1 - t) ** 2 * (left.reward_se**2 + slope**2 * left.kl_se**2)
    variance += t**2 * (right.reward_se**2 + slope**2 * right.kl_se**2)
    return left.reward + t * (right.reward - left.reward), math.sqrt(variance)


def overlap(a: list[Point], b: list[Point]) -> tuple[float, float]:
    """The KL range both curves cover."""
    low = max(min(p.kl for p in a), min(p.kl for p in b))
    high = min(max(p.kl for p in a), max(p.kl for p in b))
    if low > high:
        raise ValueError(f"the curves share no KL range (A ends where B begins: {low:.3g} > {high:.3g})")
    return low, high


def matched_kl_points(a: list[Point], b: list[Point], count: int = 3) -> list[float]:
    """`count` KL values evenly inside the shared range (its ends excluded, where a curve stops)."""
    low, high = overlap(a, b)
    return [low + (high - low) * (k + 1) / (count + 1) for k in range(count)]


def compare(
    a: list[Point], b: list[Point], kls: list[float] | None = None, *, resamples: int = 2000, seed: int = 0
) -> list[Difference]:
    """reward_A(k) − reward_B(k) at each k of `kls` (default: `matched_kl_points`), with a
    standard error: a paired bootstrap over prompts where every point has its per-prompt values,
    else the points' errors propagated (`interpolate`)."""
    kls = matched_kl_points(a, b) if kls is None else kls
    low, high = overlap(a, b)
    if any(not low <= k <= high for k in kls):
        raise ValueError(f"matched KL values must lie in the shared range [{low:.3g}, {high:.3g}]")
    points = a + b
    paired = all(p.rewards and len(p.rewards) == len(points[0].rewards) == len(p.kls) for p in points)
    differences = []
    for k in kls:
        (ra, sa), (rb, sb) = interpolate(a, k), interpolate(b, k)
        differences.append(Difference(k, ra - rb, math.sqrt(sa**2 + sb**2)))
    if paired:
        for difference, se in zip(differences, _bootstrap(a, b, kls, resamples, seed), strict=True):
            difference.se = se
    return differences


def _bootstrap(a: list[Point], b: list[Point], kls: list[float], resamples: int, seed: int) -> list[float]:
    """Standard error of each difference over `resamples` resamplings of the prompts, the same
    resampled prompts for every point (the pairing)."""
    import torch

    points = a + b
    n = len(points[0].rewards)
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randint(n, (resamples, n), generator=generator)
    kl_means = torch.tensor([p.kls for p in points], dtype=torch.float64)[:, chosen].mean(-1)  # (P, R)
    reward_means = torch.tensor([p.rewards for p in points], dtype=torch.float64)[:, chosen].mean(-1)
    draws: list[list[float]] = [[] for _ in kls]
    for r in range(resamples):
        curves = [Point(float(kl_means[i, r]), float(reward_means[i, r])) for i in range(len(points))]
        curve_a, curve_b = curves[: len(a)], curves[len(a) :]
        try:
            low, high = overlap(curve_a, curve_b)
        except ValueError:
            continue
        for draw, k in zip(draws, kls, strict=True):
            k = min(max(k, low), high)  # a resample may shift the range's ends a little
            draw.append(interpolate(curve_a, k)[0] - interpolate(curve_b, k)[0])
    return [_std(draw) for draw in draws]


def _std(values: list[float]) -> float:
    if len(values) < 2:
        return math.inf
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def verdict(differences: list[Difference], *, claimed: str = "above", threshold: float = 2.0) -> str:
    """ "holds" where every difference is at least `threshold` standard errors in the claimed
    direction, "does not hold" where one is that far the other way, else "inconclusive"."""
    sign = 1.0 if claimed == "above" else -1.0
    if all(sign * d.z >= threshold for d in differences):
        return "holds"
    if any(sign * d.z <= -threshold for d in differences):
        return "does not hold"
    return "inconclusive"


def paired_difference(a: list[float], b: list[float]) -> tuple[float, float]:
    """mean(a − b) and its standard error over paired per-prompt values (the same prompts, seeds)."""
    return mean_and_se([x - y for x, y in zip(a, b, strict=True)])


def point_of(samples, metric: str = "reward") -> Point:
    """A `Point` from an evaluated policy's per-prompt values (`evaluate.Samples`): KL by the
    exact-per-token estimator against `metric` (the reward, or `judge`)."""
    values = getattr(samples, metric)
    (kl, kl_se), (value, value_se) = mean_and_se(samples.kl_exact), mean_and_se(values)
    return Point(kl, value, kl_se, value_se, kls=list(samples.kl_exact), rewards=list(values))


def front_against_trajectory(evaluated: dict) -> dict | None:
    """WARP's LITI front against the REINFORCE baseline's trajectory, both from the SFT point, at
    matched KL (`compare`), or None where either is missing. `evaluated`: name → (meta, Samples)."""
    kinds = {
        kind: [point_of(s) for meta, s in evaluated.values() if meta["kind"] == kind] for kind in ("liti", "reinforce")
    }
    sft = [point_of(s) for meta, s in evaluated.values() if meta["kind"] == "sft"]
    if not (sft and kinds["liti"] and kinds["reinforce"]):
        return None
    front, trajectory = sft + kinds["liti"], sft + kinds["reinforce"]
    differences = compare(front, trajectory)
    return {
        "a": "WARP LITI front",
        "b": "REINFORCE trajectory",
        "differences": [{"kl": d.kl, "difference": d.difference, "se": d.se, "z": d.z} for d in differences],
        "verdict": verdict(differences),
        "se": "paired bootstrap over prompts",
    }
