"""Experiment tracking, with TRL's `report_to`: tensorboard, trackio, wandb (several at once).

One tracked run per REINFORCE run, named as its folder (`iter_1/run_2`, `reinforce`), with its
per-step metrics at their steps; `reward_model` with the reward model's accuracy; `evaluation`
with each evaluated policy's results. With `log_completions`, tables of prompts, completions and
rewards too (TRL's): a run's `completions` at its logged steps, each evaluated policy's
`completions/<policy>`; a markdown text summary in TensorBoard, a `Table` in trackio and wandb.
Everything works offline: TensorBoard writes event files
under `output_dir/tensorboard/<run>`, trackio logs to its local database, wandb runs offline unless
`WANDB_MODE` says otherwise. Each tracker is an optional extra: a missing one is one line naming
the extra to install.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any, Protocol

from warp_rlhf.errors import ConfigError

EXTRAS = {"tensorboard": "tensorboard", "trackio": "trackio", "wandb": "wandb"}
"""Tracker → the module it needs (installed by `pip install 'warp-rlhf[<tracker>]'`)."""


class Destination(Protocol):
    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def text(self, name: str, text: str) -> None: ...

    def table(self, name: str, rows: list[dict[str, Any]], step: int) -> None: ...

    def finish(self) -> None: ...


def require(tracker: str) -> Any:
    """The tracker's module, or one line naming the extra that installs it."""
    try:
        return importlib.import_module(EXTRAS[tracker])
    except ImportError:
        raise ConfigError(
            f"report_to: {tracker} needs the {tracker} package: pip install 'warp-rlhf[{tracker}]'"
        ) from None


class _TensorBoard:
    def __init__(self, out: Path, name: str, config: dict):
        require("tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(out / "tensorboard" / name))
        self.writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in config.items()))

    def log(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def text(self, name: str, text: str) -> None:
        self.writer.add_text(name, text)

    def table(self, name: str, rows: list[dict[str, Any]], step: int) -> None:
        self.writer.add_text(name, markdown_table(rows), step)
        self.writer.flush()

    def finish(self) -> None:
        self.writer.close()


class _Trackio:
    def __init__(self, out: Path, name: str, config: dict):
        self.trackio = require("trackio")
        self.run = self.trackio.init(project=out.resolve().name, name=name, config=config, resume="allow")

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def text(self, name: str, text: str) -> None:
        self.run.log({name: text})

    def table(self, name: str, rows: list[dict[str, Any]], step: int) -> None:
        self.run.log({name: _dataframe_table(self.trackio, rows)}, step=step)

    def finish(self) -> None:
        self.run.finish()


class _Wandb:
    def __init__(self, out: Path, name: str, config: dict):
        self.wandb = wandb = require("wandb")
        mode = os.environ.get("WANDB_MODE", "offline")
        self.run = wandb.init(
            project=out.resolve().name, name=name, config=config, dir=str(out), mode=mode, reinit=True
        )

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def text(self, name: str, text: str) -> None:
        self.run.summary[name] = text

    def table(self, name: str, rows: list[dict[str, Any]], step: int) -> None:
        self.run.log({name: _dataframe_table(self.wandb, rows)}, step=step)

    def finish(self) -> None:
        self.run.finish()


_KINDS = {"tensorboard": _TensorBoard, "trackio": _Trackio, "wandb": _Wandb}


class Tracking:
    """The trackers of `report_to`, each with one tracked run per name, opened on first use. As a
    context manager, every tracked run is finished on exit, also when the work inside raised."""

    def __init__(self, report_to: list[str], out: Path, config: dict):
        self.kinds = [kind for kind in report_to if kind != "none"]
        self.out, self.config, self.open = out, config, {}
        for kind in self.kinds:
            require(kind)  # a missing extra is found now, before any work

    def __bool__(self) -> bool:
        return bool(self.kinds)

    def run(self, name: str) -> list[Destination]:
        if name not in self.open:
            self.open[name] = [_KINDS[kind](self.out, name, self.config) for kind in self.kinds]
        return self.open[name]

    def log(self, name: str, metrics: dict[str, Any], step: int) -> None:
        numbers = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        for destination in self.run(name):
            destination.log(numbers, step)

    def text(self, name: str, key: str, text: str) -> None:
        for destination in self.run(name):
            destination.text(key, text)

    def table(self, name: str, key: str, rows: list[dict[str, Any]], step: int) -> None:
        """Rows of the same columns (prompt, completion, reward, …) as a table `key` at `step`."""
        for destination in self.run(name):
            destination.table(key, rows, step)

    def __call__(self, spec, metrics: dict) -> None:
        """As a `Trainer`'s `log_step`: each run's metrics to the tracked run named as its folder."""
        self.log(_run_name(spec.folder.path), metrics, metrics["step"])

    def completions(self, spec, step: int, rows: list[dict[str, Any]]) -> None:
        """As a `Trainer`'s `log_step`, with `log_completions`: a step's table to the run's tracked run."""
        self.table(_run_name(spec.folder.path), "completions", rows, step)

    def close(self) -> None:
        for destinations in self.open.values():
            for destination in destinations:
                destination.finish()
        self.open.clear()

    def __enter__(self) -> Tracking:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """`rows` as a markdown table (TensorBoard's text dashboard renders it): numbers to 4
    significant digits, `|` escaped and line breaks as <br> in texts."""
    columns = list(rows[0]) if rows else []

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value).replace("|", "\\|").replace("\n", "<br>")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row[column]) for column in columns) + " |" for row in rows]
    return "\n".join(lines)


def _dataframe_table(tracker: Any, rows: list[dict[str, Any]]) -> Any:
    """`tracker.Table` (trackio's or wandb's) of `rows`, built from a pandas DataFrame as TRL does."""
    import pandas

    return tracker.Table(dataframe=pandas.DataFrame(rows))


def _run_name(folder: Path) -> str:
    """`iter_1/run_2` for a WARP run, `reinforce` for the baseline."""
    return f"{folder.parent.name}/{folder.name}" if folder.name.startswith("run_") else folder.name
