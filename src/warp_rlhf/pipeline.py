"""The stages of a run over one output folder; each reuses what an earlier call finished.

output_dir/
  config.yaml          the resolved config (a folder belongs to one config)
  data/splits.json     reward pairs, RL prompts and held-out prompts
  reward_model/        `from_pretrained`-loadable reward model + metrics.json
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

from warp_rlhf import assets
from warp_rlhf.checkpoint import read_json, write_json, write_text
from warp_rlhf.config import WarpConfig, config_to_dict, dump_config, read_yaml
from warp_rlhf.data import Splits, load_reviews, split_reviews
from warp_rlhf.errors import ConfigError
from warp_rlhf.models import load_causal_lm, load_tokenizer
from warp_rlhf.reward import METRICS_FILE, RewardModel, train_reward_model

CONFIG_FILE = "config.yaml"
SPLITS_FILE = Path("data") / "splits.json"
REWARD_DIR = "reward_model"
FINAL_DIR = "final"


def prepare_output(config: WarpConfig, *, overwrite: bool = False) -> Path:
    """Claim `output_dir` for this config: refuse a folder that holds a different run."""
    out = Path(config.output_dir)
    saved = out / CONFIG_FILE
    if saved.exists() and not overwrite:
        previous = read_yaml(saved)
        changed = [name for name, value in config_to_dict(config).items() if previous.get(name) != value]
        if changed:
            name = changed[0]
            raise ConfigError(
                f"output_dir {out} holds a run with a different config ({name}: {previous.get(name)!r} → "
                f"{getattr(config, name)!r}); pass --overwrite or choose another output_dir"
            )
    try:
        if overwrite and out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        write_text(saved, dump_config(config))
    except OSError as error:
        raise ConfigError(f"output_dir {out} cannot be written: {error.strerror or error}") from None
    return out


def policy_tokenizer(config: WarpConfig):
    return load_tokenizer(assets.resolve_policy(config), trust_remote_code=config.trust_remote_code)


def load_splits(config: WarpConfig, out: Path) -> Splits:
    """The run's data splits, cut once and kept in `data/splits.json`."""
    path = out / SPLITS_FILE
    if path.exists():
        return Splits(**{k: [tuple(p) if isinstance(p, list) else p for p in v] for k, v in read_json(path).items()})
    splits = split_reviews(load_reviews(config), config, policy_tokenizer(config))
    write_json(path, dataclasses.asdict(splits))
    return splits


def reward_stage(config: WarpConfig, out: Path) -> dict:
    """Train the reward model unless `reward_model/` is already complete; return its metrics."""
    folder = out / REWARD_DIR
    if (folder / METRICS_FILE).exists():
        return read_json(folder / METRICS_FILE) | {"reused": True}
    splits = load_splits(config, out)
    return train_reward_model(config, assets.resolve_backbone(config), splits.reward_train, splits.reward_eval, folder)


def reward_function(reward: RewardModel):
    """r(x, y) = the reward model's score of the prompt followed by its completion."""

    def score(prompts: list[str], completions: list[str]):
        return reward.score([p + c for p, c in zip(prompts, completions, strict=True)])

    return score


def train_stage(config: WarpConfig, out: Path, *, resume: bool = False) -> Path:
    """Run WARP (training the reward model first if needed); return the final policy folder."""
    from warp_rlhf.warp import save_policy, train_warp

    final = out / FINAL_DIR
    if (final / "config.json").exists():
        return final
    if not resume and any(out.glob("iter_*")):
        raise ConfigError(
            f"output_dir {out} holds an unfinished WARP run: pass --resume to continue it, or --overwrite"
        )
    reward_stage(config, out)
    splits = load_splits(config, out)
    device = config.torch_device
    policy_path = assets.resolve_policy(config)
    policy = load_causal_lm(policy_path, trust_remote_code=config.trust_remote_code).to(device)
    tokenizer = load_tokenizer(policy_path, padding_side="left", trust_remote_code=config.trust_remote_code)
    reward = RewardModel.from_pretrained(out / REWARD_DIR, device=device)
    merged, summaries = train_warp(config, policy, tokenizer, reward_function(reward), splits.rl_prompts, out)
    save_policy(policy, tokenizer, merged, final, config, {"iterations": summaries})
    return final
