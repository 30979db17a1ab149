"""Training-seed error bars: each method's curve as the mean over its seeds, at matched KL.

A per-seed comparison (`compare`) pairs two curves over the same prompts: its standard error is
the evaluation's, and says nothing of how much another training seed would move the curve. Here
each method (WARP's front, REINFORCE's trajectory, RLOO's trajectory) has one curve per training
seed; at each KL value k inside the range every curve covers, its reward is interpolated
(`interpolate`), and the method's value is the mean over seeds with standard error
std(ddof = 1) / sqrt(seeds): the seeds' spread, which holds the evaluation's noise as well. A − B at
k is the difference of two such means, with s.e. sqrt(s.e._A² + s.e._B²) (the seeds of two
methods are independent runs). The verdict is the per-seed comparisons' rule (`verdict`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from matplotlib.figure import Figure

from warp_rlhf.stages.compare import Difference, Point, interpolate, mean_and_se, verdict
from warp_rlhf.stages.plots import KL_LABEL

GRID = 21
"""KL values of the mean curves, evenly inside the shared range (its ends excluded)."""


@dataclass
class MeanCurve:
    """A method's reward at each KL of `kls`: the mean over its seeds and its standard error."""

    label: str
    seeds: int
    kls: list[float]
    mean: list[float]
    se: list[float]


def shared_range(curves: list[list[Point]]) -> tuple[float, float]:
    """The KL range every curve covers."""
    low, high = max(min(p.kl for p in c) for c in curves), min(max(p.kl for p in c) for c in curves)
    if low >= high:
        raise ValueError(f"the curves share no KL range ({low:.3g} >= {high:.3g})")
    return low, high


def grid(low: float, high: float, count: int = GRID) -> list[float]:
    return [low + (high - low) * (k + 1) / (count + 1) for k in range(count)]


def mean_curve(label: str, seeds: list[list[Point]], kls: list[float]) -> MeanCurve:
    """The mean over `seeds` (one curve each) of the reward at each KL of `kls`, ± the seeds' s.e."""
    means = [mean_and_se([interpolate(curve, k)[0] for curve in seeds]) for k in kls]
    return MeanCurve(label, len(seeds), kls, [m for m, _ in means], [s for _, s in means])


def difference(a: MeanCurve, b: MeanCurve) -> list[Difference]:
    """mean_A(k) − mean_B(k) at each k of their (shared) KL values, with the seeds' s.e."""
    if a.kls != b.kls:
        raise ValueError("the mean curves must be read at the same KL values")
    return [
        Difference(k, ma - mb, math.sqrt(sa**2 + sb**2))
        for k, ma, sa, mb, sb in zip(a.kls, a.mean, a.se, b.mean, b.se, strict=True)
    ]


def seed_level(methods: dict[str, tuple[str, list[list[Point]]]], claims: list[tuple[str, str, str]]) -> dict:
    """`methods`: name → (label, one curve per seed, each from the SFT point); `claims`: (key, A, B).
    The mean curves on the range all of them cover, and each claim's A − B at three KL values
    evenly inside it (as the per-seed rule reads them) with its verdict, as results.json keeps them."""
    low, high = shared_range([curve for _, curves in methods.values() for curve in curves])
    kls = grid(low, high)
    means = {name: mean_curve(label, curves, kls) for name, (label, curves) in methods.items()}
    matched = {name: mean_curve(label, curves, grid(low, high, 3)) for name, (label, curves) in methods.items()}
    answers = []
    for key, a, b in claims:
        differences = difference(matched[a], matched[b])
        answers.append({
            "claim": key, "a": a, "b": b, "label_a": means[a].label, "label_b": means[b].label,
            "differences": [{"kl": d.kl, "difference": d.difference, "se": d.se, "z": d.z} for d in differences],
            "verdict": verdict(differences),
        })  # fmt: skip
    curves = {name: vars(curve) for name, curve in means.items()}
    return {"range": [low, high], "curves": curves, "claims": answers, "se": "seeds' spread, std / sqrt(seeds)"}


def seed_level_figure(results: dict) -> Figure:
    """Each method's mean reward over its training seeds against KL, ± 2 s.e. of the seeds (a band)."""
    figure = Figure(figsize=(6.4, 4.6))
    axes = figure.subplots()
    for curve in results["curves"].values():
        low = [m - 2 * s for m, s in zip(curve["mean"], curve["se"], strict=True)]
        high = [m + 2 * s for m, s in zip(curve["mean"], curve["se"], strict=True)]
        (line,) = axes.plot(curve["kls"], curve["mean"], label=f"{curve['label']} ({curve['seeds']} seeds)")
        axes.fill_between(curve["kls"], low, high, alpha=0.2, color=line.get_color())
    axes.set_xlabel(KL_LABEL)
    axes.set_ylabel("mean reward over training seeds (± 2 s.e.)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7)
    return figure
