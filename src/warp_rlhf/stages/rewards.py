"""The reward r(x, y) that WARP maximises: a weighted sum of rewards, given as TRL's `reward_funcs`.

Each entry of `reward_funcs` is one of:

- `trained`: the Bradley–Terry reward model of the reward stage (`reward_model/`), the default;
- `file.py:name` or `package.module:name`: a Python function, called as TRL calls one,
  `f(prompts=…, completions=…, completion_ids=…, **columns) -> list[float | None]`, with the
  prompts as the dataset holds them (texts, or message lists with completions as
  `[{"role": "assistant", "content": …}]`); a function object given to `WarpTrainer` is the same,
  named `<name>@<fingerprint of its code>` (`functions`);
- a sequence-classification model (hub name or folder) used as it is: `MODEL[LABEL]` or
  `MODEL[index]` picks the output that is the reward (a one-output model needs no choice).

A function may be `async def` (it is awaited, as TRL awaits one). r = Σ_k w_k r_k with
`reward_weights` (1 each by default); a None in a function's output means that reward does not
apply to that completion, and it is left out of the sum there (TRL's rule). Every reward's
values are checked: one number (or None) per completion, each finite in float32, else one line
naming the reward; a function that raises is one line naming it and its error (`RewardError`).
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib
import importlib.util
import inspect
import math
import re
import reprlib
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from warp_rlhf.algorithm.reinforce import Prompt, TrainingError
from warp_rlhf.errors import ConfigError
from warp_rlhf.stages.models import check_loadable, check_safetensors, model_config
from warp_rlhf.stages.prompts import scored_text
from warp_rlhf.stages.reward import RewardModel, output_index, trained_reward

TRAINED = "trained"
_FUNCTION = re.compile(r"^(?P<where>[^\[\]]+\.py|[A-Za-z_][\w.]*):(?P<name>[A-Za-z_]\w*)$")
_OBJECT = re.compile(r"^(?P<name>[^@]+)@(?P<fingerprint>[0-9a-f]{8,})$")
"""A function object's spec: its name and a fingerprint of its code (`function_spec`)."""
_MODEL = re.compile(r"^(?P<model>[^\[\]]+?)(?:\[(?P<output>[^\[\]]+)\])?$")
_NOT_NUMBERS = (TypeError, ValueError, RuntimeError, OverflowError)  # what `torch.as_tensor` raises on them


class RewardError(TrainingError):
    """A reward cannot be computed: its function raised, or it did not give one finite number per
    completion. A plain one-line message, so the error pickles (a run's process relays it)."""


@dataclass
class Reward:
    """One reward: its name in results (`reward_<key>_mean`), its weight, and r_k(x, y)."""

    spec: str
    weight: float
    score: Callable[..., object]  # (prompts, completions, completion_ids) → one value per completion

    @property
    def key(self) -> str:
        """A function's name, or a model's folder name and output: `reward_<key>_mean` in results."""
        function = _FUNCTION.match(self.spec) or _OBJECT.match(self.spec)
        name = function["name"] if function else self.spec.rstrip("/").rsplit("/", 1)[-1]
        return re.sub(r"\W+", "_", name).strip("_").lower()

    def __call__(
        self, prompts: list[Prompt], completions: list[str], completion_ids: list[list[int]] | None = None
    ) -> torch.Tensor:
        """One value per completion, NaN where the reward said None (it does not apply there)."""
        returned = self.score(prompts, completions, completion_ids)
        applies = [value is not None for value in returned] if isinstance(returned, list | tuple) else []
        if all(applies):
            return self._check(returned, len(completions))
        if len(returned) != len(completions):
            raise RewardError(f"reward {self.spec} returned {len(returned)} values for {len(completions)} completions")
        values = torch.full((len(completions),), math.nan)
        values[torch.tensor(applies)] = self._check([v for v in returned if v is not None], sum(applies))
        return values

    def _check(self, returned, count: int) -> torch.Tensor:
        try:
            values = torch.as_tensor(returned, dtype=torch.float32).flatten()
        except _NOT_NUMBERS:
            values = None
        if values is None or not torch.isfinite(values).all():
            raise RewardError(f"reward {self.spec} returned {_not_float32(returned)}")
        if values.numel() != count:
            raise RewardError(f"reward {self.spec} returned {values.numel()} values for {count} completions")
        return values


def _not_float32(returned) -> str:
    """What makes `returned` not one float32 number per completion: the first value that is not a
    number, is not finite, or is beyond float32's range (a Python float is a float64)."""
    try:
        wide = torch.as_tensor(returned, dtype=torch.float64).flatten().tolist()
    except _NOT_NUMBERS:
        wide = None
    largest = torch.finfo(torch.float32).max
    index, value = next(((i, v) for i, v in enumerate(wide or []) if not abs(v) <= largest), (None, None))
    if index is None:
        return _not_numbers(returned)
    if math.isfinite(value):
        return f"{value:g} for completion {index + 1}, which overflows float32 (largest {largest:.4g}): scale it down"
    return f"a value that is not finite ({value}) for completion {index + 1}"


def _not_numbers(returned) -> str:
    """The first value of `returned` that is not a number, or what `returned` is instead of a list."""
    for index, value in enumerate(returned if isinstance(returned, list | tuple) else []):
        try:
            torch.as_tensor(value, dtype=torch.float64)
        except _NOT_NUMBERS:
            return f"{reprlib.repr(value)} for completion {index + 1}, not a number"
    return f"{reprlib.repr(returned)} ({type(returned).__name__}), not a list of numbers"


class Rewards:
    """r(x, y) = Σ_k w_k r_k(x, y): the `RewardFn` a run maximises; `each` gives every r_k."""

    def __init__(self, rewards: list[Reward]):
        self.rewards = rewards

    def each(
        self, prompts: list[Prompt], completions: list[str], completion_ids: list[list[int]] | None = None
    ) -> dict[str, torch.Tensor]:
        return {reward.key: reward(prompts, completions, completion_ids) for reward in self.rewards}

    def total(self, each: dict[str, torch.Tensor]) -> torch.Tensor:
        """Σ_k w_k r_k, each r_k left out where it is NaN (the reward said None: it does not apply)."""
        first, *rest = self.rewards
        total = (each[first.key] * first.weight).nan_to_num(nan=0.0)
        for reward in rest:
            total = total + (each[reward.key] * reward.weight).nan_to_num(nan=0.0)
        return total

    def __call__(
        self, prompts: list[Prompt], completions: list[str], completion_ids: list[list[int]] | None = None
    ) -> torch.Tensor:
        return self.total(self.each(prompts, completions, completion_ids))


def specs(config) -> list[str]:
    return list(config.reward_funcs) or [TRAINED]


def needs_reward_stage(config) -> bool:
    """The reward stage runs only when a reward, or the judge, is the model it trains."""
    return TRAINED in specs(config) or config.judge == TRAINED


Functions = Mapping[str, Callable]
"""Function objects by their spec (`function_spec`): the rewards `WarpTrainer` was given as objects."""


def function_spec(function: Callable) -> str:
    """`<name>@<fingerprint>`: a function object's entry in `reward_funcs`. The fingerprint is of its
    source (else its bytecode), so a changed function is a changed setting on resume, and the same
    function defined again (a notebook cell run twice) is the same one."""
    try:
        code = inspect.getsource(function).encode()
    except (OSError, TypeError):
        inner = getattr(function, "__code__", None)
        code = inner.co_code + repr(inner.co_consts).encode() if inner is not None else repr(function).encode()
    name = getattr(function, "__name__", type(function).__name__).strip("<>") or "function"
    return f"{name}@{hashlib.sha256(code).hexdigest()[:12]}"


def build_rewards(
    config, out: Path, policy_tokenizer, device: str = "cpu", functions: Functions | None = None
) -> Rewards:
    """Every reward of `config`, loaded (models on `device`), with its weight."""
    weights = config.reward_weights or [1.0] * len(specs(config))
    rewards = [
        Reward(spec, weight, build_reward(spec, config, out, policy_tokenizer, device, functions))
        for spec, weight in zip(specs(config), weights, strict=True)
    ]
    keys = [reward.key for reward in rewards]
    if len(set(keys)) < len(keys):
        raise ConfigError(f"reward_funcs name two rewards alike ({', '.join(keys)}): give each its own name")
    return Rewards(rewards)


def build_reward(
    spec: str, config, out: Path, policy_tokenizer, device: str = "cpu", functions: Functions | None = None
):
    """r_k(prompts, completions, completion_ids) for one entry of `reward_funcs` (or of `judge`)."""
    functions = functions or {}
    if spec in functions:
        return _function_reward(functions[spec], _OBJECT.match(spec)["name"] if _OBJECT.match(spec) else spec)
    if spec == TRAINED:
        return _model_reward(trained_reward(config, out, device), policy_tokenizer)
    function = _FUNCTION.match(spec)
    if function:
        return _function_reward(load_function(function["where"], function["name"]), spec)
    model = _MODEL.match(spec)
    if not model:
        raise ConfigError(f"reward {spec!r} is not a model, MODEL[LABEL], file.py:name or package.module:name")
    check_safetensors(model["model"], "reward")
    scorer = RewardModel.from_pretrained(
        model["model"], output=model["output"], device=device, trust_remote_code=config.trust_remote_code
    )
    return _model_reward(scorer, policy_tokenizer)


def _model_reward(scorer: RewardModel, policy_tokenizer):
    def score(prompts: list[Prompt], completions: list[str], completion_ids=None) -> torch.Tensor:
        tokenizers = [scorer.tokenizer, policy_tokenizer]
        return scorer.score([scored_text(p, c, tokenizers) for p, c in zip(prompts, completions, strict=True)])

    return score


def _function_reward(function: Callable, spec: str):
    """Call `function` as TRL does (awaited when it is `async def`); an error it raises becomes a
    one-line `RewardError` naming it, never a traceback."""

    def score(prompts: list[Prompt], completions: list[str], completion_ids: list[list[int]] | None = None):
        conversational = any(p.conversational for p in prompts)
        columns = {name: [p.columns.get(name) for p in prompts] for name in (prompts[0].columns if prompts else {})}
        shown = [p.raw if p.conversational else p.text for p in prompts]
        given = [[{"role": "assistant", "content": c}] for c in completions] if conversational else completions
        try:
            values = function(prompts=shown, completions=given, completion_ids=completion_ids, **columns)
            return asyncio.run(values) if inspect.iscoroutine(values) else values
        except Exception as error:  # the user's code: any error is theirs to fix, in one line
            reason = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
            raise RewardError(
                f"reward function {spec} raised {type(error).__name__}{': ' + reason if reason else ''}"
            ) from None

    return score


def load_function(where: str, name: str) -> Callable:
    """A reward function from `file.py` (relative to the working folder) or an importable module."""
    if where.endswith(".py"):
        path = Path(where).expanduser().resolve()
        if not path.is_file():
            raise ConfigError(f"reward function file {where} does not exist")
        module_name = f"warp_rlhf_reward_{abs(hash(str(path)))}"
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as error:
            raise ConfigError(
                f"reward function file {where} fails to import: {type(error).__name__}: {error}"
            ) from None
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as error:
            raise ConfigError(f"reward function module {where} cannot be imported: {error}") from None
    function = getattr(module, name, None)
    if not callable(function):
        raise ConfigError(f"reward function {where}:{name} does not exist ({where} has no function '{name}')")
    return function


def check_reward(spec: str, config, functions: Functions | None = None) -> None:
    """Fail in one line before any work on a reward that cannot be built: a missing file or
    function, a model that is not there, an output it does not have or a choice it needs, weights
    that are not safetensors, a tokenizer that reads no text."""
    if spec == TRAINED or spec in (functions or {}):
        return
    if _OBJECT.match(spec):
        raise ConfigError(f"reward {spec} is a function object that was not given: pass it in reward_funcs")
    function = _FUNCTION.match(spec)
    if function:
        load_function(function["where"], function["name"])
        return
    model = _MODEL.match(spec)
    if not model:
        raise ConfigError(f"reward {spec!r} is not a model, MODEL[LABEL], file.py:name or package.module:name")
    classifier = model_config(model["model"], "reward", trust_remote_code=config.trust_remote_code)
    output_index(classifier, model["output"], f"reward {model['model']}")
    check_loadable(model["model"], "reward", trust_remote_code=config.trust_remote_code)


def classifier_model(spec: str) -> str | None:
    """The model of a `reward_funcs` entry that is a classifier (MODEL or MODEL[OUTPUT]); None for
    the trained reward model and for functions."""
    if spec == TRAINED or _FUNCTION.match(spec) or _OBJECT.match(spec):
        return None
    model = _MODEL.match(spec)
    return model["model"] if model else None
