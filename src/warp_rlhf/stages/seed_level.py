"""Training-seed error bars: each method's curve as the mean over its training seeds, at matched KL.

A per-seed comparison (`compare`) pairs two curves over the same prompts: its standard error is
the evaluation's, and says nothing of how much another training seed would move the curves.
Here every method (WARP's front, REINFORCE's trajectory, RLOO's trajectory) has one curve per
training seed, each from the SFT point; a curve's reward at KL k is read by `interpolate`.

- A claim "A lies above B" is read at three KL values evenly inside the range every seed's curve
  of A and of B covers. At each k, d_s = A_s(k) − B_s(k) for each seed s (the two methods' runs
  of one `train_seed`, evaluated on the same prompts with the same sampling seeds); A − B is the
  mean of the d_s, with standard error std(d_s, ddof = 1) / sqrt(n): their spread holds both
  methods' training-seed variance and each seed's evaluation noise (not the choice of prompts,
  which all seeds share). With n seeds the mean over s.e. follows Student's t with n − 1 degrees
  of freedom, so the verdict's threshold is its 97.5% quantile (4.30 for 3 seeds; never below 2,
  the per-seed rule's), in place of 2 (`verdict`).
- A method's mean curve, for the figure: at each KL of a grid inside the range every curve of
  every method covers, the mean over seeds ± std / sqrt(n).
"""

from __future__ import annotations

from dataclasses import dataclass

from matplotlib.figure import Figure

from warp_rlhf.stages.compare import Difference, Point, interpolate, mean_and_se, verdict
from warp_rlhf.stages.plots import KL_LABEL

GRID = 21
"""KL values of the mean curves, evenly inside the shared range (its ends excluded)."""

T_975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
    2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip
"""Student's t 97.5% quantile for 1 … 30 degrees of freedom."""


def t_threshold(seeds: int) -> float:
    """The verdict's threshold in standard errors for a mean over `seeds` paired differences."""
    if seeds < 2:
        raise ValueError(f"a standard error over training seeds needs at least 2 seeds, not {seeds}")
    return max(2.0, T_975[seeds - 2]) if seeds - 1 <= len(T_975) else 2.0


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


def seed_difference(a: list[list[Point]], b: list[list[Point]]) -> tuple[list[Difference], str]:
    """A − B over paired seeds (`a[s]`, `b[s]` of one training seed) at three KL values inside the
    range all of them cover: the mean of the per-seed differences ± their s.e., and the verdict
    with the t threshold."""
    if len(a) != len(b):
        raise ValueError(f"paired seeds: {len(a)} curves against {len(b)}")
    threshold = t_threshold(len(a))
    differences = []
    for k in grid(*shared_range(a + b), 3):
        mean, se = mean_and_se([interpolate(ca, k)[0] - interpolate(cb, k)[0] for ca, cb in zip(a, b, strict=True)])
        differences.append(Difference(k, mean, se))
    return differences, verdict(differences, threshold=threshold)


def seed_level(methods: dict[str, tuple[str, list[list[Point]]]], claims: list[tuple[str, str, str]]) -> dict:
    """`methods`: name → (label, one curve per seed in the order of the seeds); `claims`: (key, A, B).
    Each method's mean curve, and each claim's A − B (`seed_difference`), as results.json keeps them."""
    kls = grid(*shared_range([curve for _, curves in methods.values() for curve in curves]))
    answers = []
    for key, a, b in claims:
        differences, verdict_ = seed_difference(methods[a][1], methods[b][1])
        answers.append({
            "claim": key, "a": a, "b": b, "label_a": methods[a][0], "label_b": methods[b][0],
            "differences": [{"kl": d.kl, "difference": d.difference, "se": d.se, "z": d.z} for d in differences],
            "threshold": t_threshold(len(methods[a][1])), "verdict": verdict_,
        })  # fmt: skip
    curves = {name: vars(mean_curve(label, seeds, kls)) for name, (label, seeds) in methods.items()}
    return {"curves": curves, "claims": answers, "se": "spread of the per-seed differences, std / sqrt(seeds)"}


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
