"""The reward r(x, y) that WARP maximises: a weighted sum of rewards, given as TRL's `reward_funcs`.

Each entry of `reward_funcs` is one of:

- `trained`: the Bradley–Terry reward model of the reward stage (`reward_model/`), the default;
- `file.py:name` or `package.module:name`: a Python function, called as TRL calls one,
  `f(prompts=…, completions=…, **columns) -> list[float]`, with the prompts as the dataset holds
  them (texts, or message lists with completions as `[{"role": "assistant", "content": …}]`);
- a sequence-classification model (hub name or folder) used as it is: `MODEL[LABEL]` or
  `MODEL[index]` picks the output that is the reward (a one-output model needs no choice).

r = Σ_k w_k r_k with `reward_weights` (1 each by default). Every reward's values are checked: as
many as completions, all finite, else one line naming the reward.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from warp_rlhf.algorithm.reinforce import Prompt, TrainingError
from warp_rlhf.errors import ConfigError
from warp_rlhf.layout import OutputDir
from warp_rlhf.stages.models import model_config
from warp_rlhf.stages.prompts import scored_text
from warp_rlhf.stages.reward import RewardModel, output_index

TRAINED = "trained"
_FUNCTION = re.compile(r"^(?P<where>[^\[\]]+\.py|[A-Za-z_][\w.]*):(?P<name>[A-Za-z_]\w*)$")
_MODEL = re.compile(r"^(?P<model>[^\[\]]+?)(?:\[(?P<output>[^\[\]]+)\])?$")


@dataclass
class Reward:
    """One reward: its name in results (`reward_<key>_mean`), its weight, and r_k(x, y)."""

    spec: str
    weight: float
    score: Callable[[list[Prompt], list[str]], object]

    @property
    def key(self) -> str:
        """A function's name, or a model's folder name and output: `reward_<key>_mean` in results."""
        function = _FUNCTION.match(self.spec)
        name = function["name"] if function else self.spec.rstrip("/").rsplit("/", 1)[-1]
        return re.sub(r"\W+", "_", name).strip("_").lower()

    def __call__(self, prompts: list[Prompt], completions: list[str]) -> torch.Tensor:
        values = self.score(prompts, completions)
        try:
            values = torch.as_tensor(values, dtype=torch.float32).flatten()
        except (TypeError, ValueError, RuntimeError):
            raise TrainingError(f"reward {self.spec} returned {type(values).__name__}, not a list of numbers") from None
        if values.numel() != len(completions):
            raise TrainingError(
                f"reward {self.spec} returned {values.numel()} values for {len(completions)} completions"
            )
        if not torch.isfinite(values).all():
            bad = next(v for v in values.tolist() if not math.isfinite(v))
            raise TrainingError(f"reward {self.spec} returned a value that is not finite ({bad})")
        return values


class Rewards:
    """r(x, y) = Σ_k w_k r_k(x, y): the `RewardFn` a run maximises; `each` gives every r_k."""

    def __init__(self, rewards: list[Reward]):
        self.rewards = rewards

    def each(self, prompts: list[Prompt], completions: list[str]) -> dict[str, torch.Tensor]:
        return {reward.key: reward(prompts, completions) for reward in self.rewards}

    def total(self, each: dict[str, torch.Tensor]) -> torch.Tensor:
        first, *rest = self.rewards
        total = each[first.key] * first.weight
        for reward in rest:
            total = total + each[reward.key] * reward.weight
        return total

    def __call__(self, prompts: list[Prompt], completions: list[str]) -> torch.Tensor:
        return self.total(self.each(prompts, completions))


def specs(config) -> list[str]:
    return list(config.reward_funcs) or [TRAINED]


def needs_reward_stage(config) -> bool:
    """The reward stage runs only when a reward, or the judge, is the model it trains."""
    return TRAINED in specs(config) or config.judge == TRAINED


def build_rewards(config, out: Path, policy_tokenizer, device: str = "cpu") -> Rewards:
    """Every reward of `config`, loaded (models on `device`), with its weight."""
    weights = config.reward_weights or [1.0] * len(specs(config))
    rewards = [
        Reward(spec, weight, build_reward(spec, config, out, policy_tokenizer, device))
        for spec, weight in zip(specs(config), weights, strict=True)
    ]
    keys = [reward.key for reward in rewards]
    if len(set(keys)) < len(keys):
        raise ConfigError(f"reward_funcs name two rewards alike ({', '.join(keys)}): give each its own name")
    return Rewards(rewards)


def build_reward(spec: str, config, out: Path, policy_tokenizer, device: str = "cpu"):
    """r_k(prompts, completions) for one entry of `reward_funcs` (or of `judge`)."""
    if spec == TRAINED:
        return _model_reward(RewardModel.from_pretrained(OutputDir(out).reward_model, device=device), policy_tokenizer)
    function = _FUNCTION.match(spec)
    if function:
        return _function_reward(load_function(function["where"], function["name"]))
    model = _MODEL.match(spec)
    if not model:
        raise ConfigError(f"reward {spec!r} is not a model, MODEL[LABEL], file.py:name or package.module:name")
    scorer = RewardModel.from_pretrained(
        model["model"], output=model["output"], device=device, trust_remote_code=config.trust_remote_code
    )
    return _model_reward(scorer, policy_tokenizer)


def _model_reward(scorer: RewardModel, policy_tokenizer):
    def score(prompts: list[Prompt], completions: list[str]) -> torch.Tensor:
        tokenizers = [scorer.tokenizer, policy_tokenizer]
        return scorer.score([scored_text(p, c, tokenizers) for p, c in zip(prompts, completions, strict=True)])

    return score


def _function_reward(function: Callable):
    def score(prompts: list[Prompt], completions: list[str]):
        conversational = any(p.conversational for p in prompts)
        columns = {name: [p.columns.get(name) for p in prompts] for name in (prompts[0].columns if prompts else {})}
        shown = [p.raw if p.conversational else p.text for p in prompts]
        given = [[{"role": "assistant", "content": c}] for c in completions] if conversational else completions
        return function(prompts=shown, completions=given, **columns)

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


def check_reward(spec: str, config) -> None:
    """Fail in one line before any work on a reward that cannot be built: a missing file or
    function, a model that is not there, an output it does not have or a choice it needs."""
    if spec == TRAINED:
        return
    function = _FUNCTION.match(spec)
    if function:
        load_function(function["where"], function["name"])
        return
    model = _MODEL.match(spec)
    if not model:
        raise ConfigError(f"reward {spec!r} is not a model, MODEL[LABEL], file.py:name or package.module:name")
    classifier = model_config(model["model"], "reward", trust_remote_code=config.trust_remote_code)
    output_index(classifier, model["output"], f"reward {model['model']}")
