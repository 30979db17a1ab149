"""`warp-rlhf sweep --param FIELD --values V1,V2,…`: train + evaluate WARP once per value.

Each value gets `output_dir/sweep/<field>=<value>/` (a `/` in the value written `_`, so that
every value's folder lies inside sweep/). When the field only changes WARP (not the data or
the reward model), every value shares the parent folder's reward model and splits. Every value is
checked — its config, its models, its folder — before anything is written, and a sweep writes
nowhere but under `output_dir`. Outputs: sweep/summary.csv, sweep/summary.json, plots of reward
and KL against the value, the LITI fronts of all values on one figure, and a section in report.md.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import shutil
from pathlib import Path

from matplotlib.figure import Figure

from warp_rlhf.checkpoint import write_json, write_text
from warp_rlhf.config import FIELDS, WarpConfig, parse_value, unknown_field, validate
from warp_rlhf.errors import ConfigError
from warp_rlhf.layout import OutputDir
from warp_rlhf.stages.output import REWARD_FIELDS, check_compatible, refuse_foreign
from warp_rlhf.stages.pipeline import (
    check_models,
    evaluate_stage,
    load_splits,
    prepare_output,
    reward_stage,
    train_stage,
)
from warp_rlhf.stages.plots import KL_LABEL, cell, save_figure

PATH_FIELDS = ("output_dir", "cache_dir")
"""Fields that say where a run writes: a sweep's values each live in their own folder under
output_dir/sweep/, so these are not swept."""
NAME_MAX = 255
"""The longest file name (bytes) of common file systems."""


def value_folder(param: str, text: str) -> str:
    """The folder name of one value, `<param>=<value>`, with path separators written `_`: one
    folder, never a path leading out of sweep/."""
    name = f"{param}={text}".replace("/", "_")
    if len(name.encode()) > NAME_MAX:
        raise ConfigError(f"sweep value {text!r} is too long for a folder name ({NAME_MAX} bytes with '{param}=')")
    return name


def sweep_configs(config: WarpConfig, param: str, values: list[str]) -> list[tuple[str, WarpConfig]]:
    """One validated config per value, each in its own folder under output_dir/sweep/ (all built
    before anything runs)."""
    if param not in FIELDS:
        raise unknown_field(param)
    if param in PATH_FIELDS:
        raise ConfigError(
            f"sweep --param {param}: {' and '.join(PATH_FIELDS)} say where a run writes and cannot be swept "
            f"(each value runs in {Path(config.output_dir) / 'sweep'}/<field>=<value>/)"
        )
    if not values:
        raise ConfigError("sweep needs at least one value (--values V1,V2,…)")
    out, configs, folders = Path(config.output_dir) / "sweep", [], {}
    for text in values:
        folder = value_folder(param, text)
        if folder in folders:
            raise ConfigError(f"sweep values {folders[folder]!r} and {text!r} would share the folder sweep/{folder}")
        folders[folder] = text
        sub = dataclasses.replace(config, **{param: parse_value(param, text), "output_dir": str(out / folder)})
        validate(sub)
        configs.append((text, sub))
    return configs


def check_sweep(configs: list[tuple[str, WarpConfig]], *, overwrite: bool) -> None:
    """Refuse, before any work, a value whose models cannot serve their roles or whose folder a
    rerun cannot take (another program's, or finished work made with other settings)."""
    for _, sub in configs:
        check_models(sub)
        out = Path(sub.output_dir)
        if not overwrite and out.is_dir():  # --overwrite empties sweep/ with the parent folder
            refuse_foreign(out)
            check_compatible(sub, out)


def run_sweep(
    config: WarpConfig, param: str, values: list[str], *, overwrite: bool = False, config_file: str | None = None
) -> list[dict]:
    """Train + evaluate per value; returns one summary row per value."""
    configs = sweep_configs(config, param, values)
    check_sweep(configs, overwrite=overwrite)
    parent = prepare_output(config, overwrite=overwrite, config_file=config_file)
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
    """Reuse the parent's reward model and its members (symlinks) and splits (a copy)."""
    parent, out = OutputDir(parent), OutputDir(out)
    out.splits.parent.mkdir(parents=True, exist_ok=True)
    if not out.splits.exists():
        shutil.copyfile(parent.splits, out.splits)
    for shared, own in ((parent.reward_model, out.reward_model), (parent.reward_members, out.reward_members)):
        if shared.exists() and not own.exists():
            own.symlink_to(shared.resolve(), target_is_directory=True)


def summary_columns(rows: list[dict]) -> list[str]:
    """The metrics of the rows, each a `_mean` or `_se` (every reward's too), in first-seen order:
    the columns of summary.csv and the keys of summary.json's rows."""
    return list(dict.fromkeys(k for row in rows for k in row if k.endswith(("_mean", "_se"))))


def write_summary(parent: Path, param: str, rows: list[dict]) -> None:
    """sweep/summary.csv and summary.json (the same columns), the figures, and report.md."""
    folder, columns = parent / "sweep", summary_columns(rows)
    table = io.StringIO()
    writer = csv.writer(table)
    writer.writerow([param, *columns])
    for row in rows:
        writer.writerow([row["value"], *(row.get(c, "") for c in columns)])
    write_text(folder / "summary.csv", table.getvalue())
    summary = [{"value": row["value"], **{c: row[c] for c in columns if c in row}} for row in rows]
    write_json(folder / "summary.json", {"param": param, "rows": summary})
    save_figure(metrics_figure(param, rows), folder / "metrics_vs_value.png")
    save_figure(fronts_figure(param, rows), folder / "fronts.png")
    lines = [f"# Sweep over {param}", "", f"| {param} | reward | judge | KL exact | KL k1 |", "|---|---|---|---|---|"]
    for row in rows:
        cells = [cell(row, m) for m in ("reward", "judge", "kl_exact", "kl_k1")]
        lines.append(f"| {row['value']} | " + " | ".join(cells) + " |")
    lines += ["", "![metrics](sweep/metrics_vs_value.png)", "", "![fronts](sweep/fronts.png)", ""]
    write_text(parent / "report.md", "\n".join(lines))


def metrics_figure(param: str, rows: list[dict]) -> Figure:
    """WARP's reward and KL against the value, ± s.e."""
    figure = Figure(figsize=(10, 4))
    axes = figure.subplots(1, 2)
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
    return figure


def fronts_figure(param: str, rows: list[dict]) -> Figure:
    """Each value's LITI front from the SFT point, reward against KL, ± s.e. on both (as the run's
    own figure, `plots.front_figure`)."""
    figure = Figure(figsize=(6.4, 4.6))
    ax = figure.subplots()
    for row in rows:
        front = sorted(
            (p for p in row["front"].values() if p["kind"] in {"sft", "liti"}), key=lambda p: p.get("nu", 0.0)
        )
        ax.errorbar(
            [p["kl_exact_mean"] for p in front], [p["reward_mean"] for p in front],
            xerr=[p["kl_exact_se"] for p in front], yerr=[p["reward_se"] for p in front],
            fmt="-o", capsize=3, label=f"{param}={row['value']}",
        )  # fmt: skip
    ax.set_xlabel(KL_LABEL)
    ax.set_ylabel("mean reward-model score")
    ax.set_title(f"LITI fronts (1−ν)θ_sft + νθ_slerp for each {param}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return figure
