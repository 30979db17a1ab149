"""Figures: reward and judge against KL to the SFT policy (like the paper's Fig. 1), and
per-run training curves. KL on the x-axis is the exact-per-token estimator, in nats.

Every figure is a `matplotlib.figure.Figure` drawn and saved on its own, never through pyplot:
importing warp_rlhf chooses no backend and leaves a notebook's plotting as it was.
"""

from __future__ import annotations

import json
from pathlib import Path

from matplotlib.figure import Figure

from warp_rlhf.checkpoint import atomic_file
from warp_rlhf.layout import OutputDir


def reward_metrics(policies: dict) -> list[str]:
    """Each reward r_k (when there are several), as `reward_<key>`."""
    first = next(iter(policies.values()))
    return [m[: -len("_mean")] for m in first if m.startswith("reward_") and m.endswith("_mean") and m != "reward_mean"]


KL_LABEL = "KL(π ‖ π_sft) per sequence, exact-per-token estimator (nats)"
"""The x-axis of every reward-against-KL figure."""


def number(value: float) -> str:
    """Three decimals, or two significant digits below 0.01, so that a small KL never reads 0.000."""
    return f"{value:.2g}" if 0 < abs(value) < 0.01 else f"{value:.3f}"


def cell(row: dict, metric: str) -> str:
    """`mean ± s.e.` of a metric of a results row, or — where the row has none (no judge)."""
    if f"{metric}_mean" not in row:
        return "—"
    return f"{number(row[metric + '_mean'])} ± {number(row[metric + '_se'])}"


def save_figure(figure: Figure, path: Path) -> None:
    """`path` as a PNG at 120 dpi, written atomically."""
    with atomic_file(path) as tmp:
        figure.savefig(tmp, format="png", dpi=120, bbox_inches="tight")


def _points(policies: dict, kind: str, metric: str) -> tuple[list, list, list, list, list]:
    rows = [(name, row) for name, row in policies.items() if row["kind"] == kind]
    return (
        [r["kl_exact_mean"] for _, r in rows],
        [r[f"{metric}_mean"] for _, r in rows],
        [r["kl_exact_se"] for _, r in rows],
        [r[f"{metric}_se"] for _, r in rows],
        [name for name, _ in rows],
    )


def front_figure(policies: dict, metric: str, label: str) -> Figure:
    """`metric` against KL(π ‖ π_sft): SFT, the WARP LITI front, WARP iterations, the baseline.

    The LITI front and the baseline's trajectory both start at the SFT point (ν = 0, step 0).
    """
    figure = Figure(figsize=(6.4, 4.6))
    axes = figure.subplots()
    styles = {
        "liti": dict(fmt="-o", color="tab:red", label="WARP LITI front (1−ν)θ_sft + νθ_slerp"),
        "iteration": dict(fmt="s", color="tab:orange", label="WARP θ_slerp per iteration"),
        "reinforce": dict(fmt="--^", color="tab:blue", label="REINFORCE baseline (trajectory)"),
        "sft": dict(fmt="*", color="black", markersize=14, label="SFT policy"),
    }
    sft, tags = policies.get("sft"), []
    for kind, style in styles.items():
        x, y, xerr, yerr, names = _points(policies, kind, metric)
        if kind in {"liti", "reinforce"} and sft and x:  # drawn from the SFT point, which the star names
            x, y = [sft["kl_exact_mean"], *x], [sft[f"{metric}_mean"], *y]
            xerr, yerr, names = [sft["kl_exact_se"], *xerr], [sft[f"{metric}_se"], *yerr], ["", *names]
        if x:
            axes.errorbar(x, y, xerr=xerr, yerr=yerr, capsize=3, **style)
        if kind != "sft":
            tags += [(xi, yi, _tag(name)) for xi, yi, name in zip(x, y, names, strict=True) if name]
    for xi, yi, tag in apart(tags):
        axes.annotate(tag, (xi, yi), fontsize=7, xytext=(4, -10), textcoords="offset points")
    axes.set_xlabel(KL_LABEL)
    axes.set_ylabel(label)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="best")
    return figure


def _tag(name: str) -> str:
    return name.replace("liti_", "ν=").replace("reinforce_", "step ").replace("iter_", "iteration ")


LABEL_ROOM = (0.1, 0.05)
"""The width and height, as fractions of the data's x and y ranges, that a point's label takes."""


def apart(tags: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """The labels that overlap no other, each curve's last point first (the end of the front, the
    last step): a label that would fall on one already kept is left out, its point still drawn."""
    if not tags:
        return []
    xs, ys = [x for x, _, _ in tags], [y for _, y, _ in tags]
    width, height = (max(xs) - min(xs)) or 1.0, (max(ys) - min(ys)) or 1.0
    kept: list[tuple[float, float, str]] = []
    for x, y, tag in reversed(tags):
        if all(abs(x - kx) >= LABEL_ROOM[0] * width or abs(y - ky) >= LABEL_ROOM[1] * height for kx, ky, _ in kept):
            kept.append((x, y, tag))
    return kept


def curves_figure(curves: dict[str, list[dict]], label: str) -> Figure:
    """Reward against KL(π ‖ π_sft), ± s.e. on both, one line per curve (results rows, in order)."""
    figure = Figure(figsize=(6.4, 4.6))
    axes = figure.subplots()
    for name, rows in curves.items():
        axes.errorbar(
            [r["kl_exact_mean"] for r in rows], [r["reward_mean"] for r in rows],
            xerr=[r["kl_exact_se"] for r in rows], yerr=[r["reward_se"] for r in rows],
            fmt="-o", capsize=3, label=name,
        )  # fmt: skip
    axes.set_xlabel(KL_LABEL)
    axes.set_ylabel(label)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="best")
    return figure


def plot_front(policies: dict, metric: str, label: str, path: Path) -> None:
    save_figure(front_figure(policies, metric, label), path)


def plot_training_curves(out: Path, path: Path) -> None:
    """`training_curves_figure` saved to `path`, where a run has logged a step."""
    figure = training_curves_figure(out)
    if figure is not None:
        save_figure(figure, path)


def training_curves_figure(out: Path) -> Figure | None:
    """Reward (the total r, however many rewards make it) and KL to the anchor over steps, one line
    per run (and the baseline); None before any step."""
    paths = OutputDir(out)
    logs = [run.metrics for run in [*paths.runs(), paths.baseline] if run.metrics.exists()]
    if not logs:
        return None
    figure = Figure(figsize=(6.4, 6.4))
    top, bottom = figure.subplots(2, 1, sharex=True)
    for log in logs:
        rows = [json.loads(line) for line in log.read_text().splitlines()]
        name = "REINFORCE baseline" if log.parent.name == "reinforce" else f"{log.parent.parent.name} {log.parent.name}"
        steps = [r["step"] for r in rows]
        top.plot(steps, [r["reward_mean"] for r in rows], label=name)
        bottom.plot(steps, [r["kl_to_anchor"] for r in rows], label=name)
    top.set_ylabel("mean reward r(x, y) of the batch")
    bottom.set_ylabel("KL to anchor, k1 (nats)")
    bottom.set_xlabel("step within the run")
    for axes in (top, bottom):
        axes.grid(alpha=0.3)
    top.legend(fontsize=8)
    return figure


def plot_results(policies: dict, folder: Path, out: Path) -> None:
    """reward_vs_kl.png (the total reward), one figure per reward when there are several, the
    judge's when there is one, and the training curves."""
    each = reward_metrics(policies)
    plot_front(policies, "reward", "mean reward" + (" (weighted total)" if each else ""), folder / "reward_vs_kl.png")
    for metric in each:
        plot_front(policies, metric, f"mean {metric.removeprefix('reward_')} reward", folder / f"{metric}_vs_kl.png")
    if "judge_mean" in next(iter(policies.values())):
        plot_front(policies, "judge", "mean judge score", folder / "judge_vs_kl.png")
    plot_training_curves(out, folder / "training_curves.png")
