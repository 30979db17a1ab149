"""`warp-rlhf sweep --param FIELD --values V1,V2,…`: train + evaluate WARP once per value.

Each value gets `output_dir/sweep/<field>=<value>/`. When the field only changes WARP (not the
data or the reward model), every value shares the parent folder's reward model and splits.
Outputs: sweep/summary.csv, sweep/summary.json, plots of reward and KL against the value, the
LITI fronts of all values on one figure, and a section in report.md.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import shutil
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from warp_rlhf.checkpoint import write_json, write_text  # noqa: E402
from warp_rlhf.config import FIELDS, WarpConfig, parse_value, unknown_field, validate  # noqa: E402
from warp_rlhf.errors import ConfigError  # noqa: E402
from warp_rlhf.layout import OutputDir  # noqa: E402
from warp_rlhf.stages.output import REWARD_FIELDS  # noqa: E402
from warp_rlhf.stages.pipeline import evaluate_stage, load_splits, prepare_output, reward_stage, train_stage  # noqa: E402
from warp_rlhf.stages.plots import KL_LABEL, cell, save_figure  # noqa: E402


def sweep_configs(config: WarpConfig, param: str, values: list[str]) -> list[tuple[str, WarpConfig]]:
    """One validated config per value (all checked before anything runs)."""
    if param not in FIELDS:
        raise unknown_field(param)
    if param == "output_dir" or not values:
        raise ConfigError(f"sweep needs a field other than output_dir and at least one value (got {values!r})")
    out = Path(config.output_dir) / "sweep"
    configs = []
    for text in values:
        sub = dataclasses.replace(
            config, **{param: parse_value(param, text), "output_dir": str(out / f"{param}={text}")}
        )
        validate(sub)
        configs.append((text, sub))
    return configs


def run_sweep(config: WarpConfig, param: str, values: list[str], *, overwrite: bool = False) -> list[dict]:
    """Train + evaluate per value; returns one summary row per value."""
    configs = sweep_configs(config, param, values)
    parent = prepare_output(config, overwrite=overwrite)
    shared = param not in REWARD_FIELDS  # then the splits and the reward model are the same for every value
    if shared:
        reward_stage(config, parent)
        load_splits(config, parent)
    rows = []
    for text, sub in configs:
        out = prepare_output(sub)
        if shared:
            share_data(parent, out)
        train_stage(sub, out, resume=True)
        results = evaluate_stage(sub, out)["policies"]
        warp = results["warp"]
        rows.append({"value": text, **{k: warp[k] for k in warp if k.endswith(("_mean", "_se"))}, "front": results})
    write_summary(parent, param, rows)
    return rows


def share_data(parent: Path, out: Path) -> None:
    """Reuse the parent's reward model (a symlink) and splits (a copy)."""
    parent, out = OutputDir(parent), OutputDir(out)
    out.splits.parent.mkdir(parents=True, exist_ok=True)
    if not out.splits.exists():
        shutil.copyfile(parent.splits, out.splits)
    if parent.reward_model.exists() and not out.reward_model.exists():
        out.reward_model.symlink_to(parent.reward_model.resolve(), target_is_directory=True)


def write_summary(parent: Path, param: str, rows: list[dict]) -> None:
    folder = parent / "sweep"
    columns = ["reward_mean", "reward_se", "judge_mean", "judge_se", "kl_exact_mean", "kl_exact_se", "kl_k1_mean",
               "kl_k1_se"]  # fmt: skip
    table = io.StringIO()
    writer = csv.writer(table)
    writer.writerow([param, *columns])
    for row in rows:
        writer.writerow([row["value"], *(row.get(c, "") for c in columns)])
    write_text(folder / "summary.csv", table.getvalue())
    write_json(
        folder / "summary.json", {"param": param, "rows": [{k: v for k, v in r.items() if k != "front"} for r in rows]}
    )

    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    labels = [row["value"] for row in rows]
    for ax, metric, name in (
        (axes[0], "reward", "WARP mean reward-model score"),
        (axes[1], "kl_exact", "WARP KL(π ‖ π_sft), exact-per-token (nats)"),
    ):
        ax.errorbar(
            labels, [r[f"{metric}_mean"] for r in rows], yerr=[r[f"{metric}_se"] for r in rows], fmt="-o", capsize=3
        )
        ax.set_xlabel(param)
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    save_figure(figure, folder / "metrics_vs_value.png")

    figure, ax = plt.subplots(figsize=(6.4, 4.6))
    for row in rows:
        front = sorted(
            (p for p in row["front"].values() if p["kind"] in {"sft", "liti"}), key=lambda p: p.get("nu", 0.0)
        )
        ax.plot(
            [p["kl_exact_mean"] for p in front],
            [p["reward_mean"] for p in front],
            "-o",
            label=f"{param}={row['value']}",
        )
    ax.set_xlabel(KL_LABEL)
    ax.set_ylabel("mean reward-model score")
    ax.set_title(f"LITI fronts (1−ν)θ_sft + νθ_slerp for each {param}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(figure, folder / "fronts.png")

    lines = [f"# Sweep over {param}", "", f"| {param} | reward | judge | KL exact | KL k1 |", "|---|---|---|---|---|"]
    for row in rows:
        cells = [cell(row, m) for m in ("reward", "judge", "kl_exact", "kl_k1")]
        lines.append(f"| {row['value']} | " + " | ".join(cells) + " |")
    lines += ["", "![metrics](sweep/metrics_vs_value.png)", "", "![fronts](sweep/fronts.png)", ""]
    write_text(parent / "report.md", "\n".join(lines))
