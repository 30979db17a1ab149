"""What users run today, as an arm of the experiment: TRL's own `RLOOTrainer`, not a re-implementation.

RLOO (Ahmadian et al., 2024) samples k completions per prompt and takes as each one's baseline the
mean reward of the other k − 1; the KL penalty β is to a reference policy. Two references:
`ema`, TRL's closest to WARP's EMA anchor (the reference mixed towards the policy every step,
θ_ref ← (1 − α) θ_ref + α θ with α = `ema_rate`), and `fixed` (θ_ref = θ_sft throughout).

The arm trains from the SFT policy on the run's RL prompts, with the run's rewards (`build_rewards`:
the trained reward model or `reward_funcs`, each scoring what it scores in WARP), at the same
number of completions as WARP's I·M·T steps of `batch_size` (`batch_size` completions per step,
`batch_size / RLOO_GENERATIONS` prompts), learning rate, β, temperature and completion length.
Its policy is saved at the REINFORCE trajectory's steps (`trajectory_steps`) into `rloo_<variant>/`,
so the experiment evaluates it exactly as it evaluates the other curves. The folder appears only
when training is done; an interrupted arm trains again from the start.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch

from warp_rlhf.algorithm.baseline import total_steps, trajectory_steps
from warp_rlhf.algorithm.merge import model_state
from warp_rlhf.algorithm.reinforce import checkpoints_gradients, run_seed
from warp_rlhf.checkpoint import atomic_dir, read_json, save_tensors, write_json
from warp_rlhf.config import WarpConfig
from warp_rlhf.errors import ConfigError
from warp_rlhf.stages import assets
from warp_rlhf.stages.models import load_tokenizer
from warp_rlhf.stages.reward import global_rng_kept
from warp_rlhf.stages.rewards import Functions, build_rewards

VARIANTS = ("ema", "fixed")
"""The reference policy of the KL penalty: mixed towards the policy every step, or the SFT policy."""

RLOO_GENERATIONS = 2
"""Completions per prompt: RLOO's k, the fewest that leave one out."""

METRICS = "metrics.json"


def rloo_folder(out: Path, variant: str) -> Path:
    return Path(out) / f"rloo_{variant}"


def check_rloo(config: WarpConfig, variant: str) -> None:
    """What TRL would refuse only once training starts, refused before any work: its generation
    batch must divide into groups of `RLOO_GENERATIONS`, and a reference synced towards the policy
    needs a KL term (β > 0)."""
    if variant not in VARIANTS:
        raise ConfigError(f"RLOO reference {variant!r} is not one of {', '.join(VARIANTS)}")
    if config.batch_size % RLOO_GENERATIONS:
        raise ConfigError(
            f"RLOO takes {RLOO_GENERATIONS} completions per prompt: batch_size={config.batch_size} must be even"
        )
    if variant == "ema" and config.beta == 0:
        raise ConfigError("RLOO with an EMA reference needs beta > 0 (TRL keeps a reference only with a KL term)")


def rloo_settings(config: WarpConfig, variant: str) -> dict:
    """The `RLOOConfig` fields the arm sets (the rest are TRL's defaults), as written in results."""
    check_rloo(config, variant)
    return {
        "per_device_train_batch_size": config.batch_size, "num_generations": RLOO_GENERATIONS,
        "max_steps": total_steps(config), "learning_rate": config.learning_rate,
        "lr_scheduler_type": "constant_with_warmup", "warmup_steps": config.warmup_steps,
        "max_grad_norm": config.max_grad_norm or 0.0, "beta": config.beta, "temperature": config.temperature,
        "top_k": 0, "top_p": 1.0,
        "max_completion_length": config.max_new_tokens, "sync_ref_model": variant == "ema",
        "ref_model_mixup_alpha": config.ema_rate, "ref_model_sync_steps": 1, "seed": run_seed(config),
    }  # fmt: skip


def rloo_files(config: WarpConfig, out: Path, variant: str) -> list[tuple[int, Path]]:
    """(step, weights file) of the arm's trajectory, at the REINFORCE trajectory's steps."""
    return [(k, rloo_folder(out, variant) / f"step_{k}.safetensors") for k in trajectory_steps(config)]


def train_rloo(
    config: WarpConfig, out: Path, prompts: list, variant: str, functions: Functions | None = None
) -> dict:
    """Train TRL's RLOOTrainer (`rloo_settings`) on `prompts` (the run's RL prompts); save its
    policy at each trajectory step; return the arm's metrics (seconds per step, TRL's version and
    settings). Done already: its metrics, nothing retrained."""
    folder = rloo_folder(out, variant)
    if (folder / METRICS).exists():
        return read_json(folder / METRICS)
    import trl
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import RLOOConfig, RLOOTrainer

    policy_path = assets.resolve_policy(config)
    tokenizer = load_tokenizer(policy_path, padding_side="left", trust_remote_code=config.trust_remote_code)
    rewards = build_rewards(config, Path(out), tokenizer, config.torch_device, functions)

    def reward(prompts, completions, completion_ids=None, index=None, **columns) -> list[float]:
        """The run's total reward Σ_k w_k r_k of each completion, for the prompt it answers."""
        return rewards([rows[i] for i in index], completions, completion_ids).tolist()

    started = time.perf_counter()
    rows = list(prompts)
    steps = set(trajectory_steps(config))
    settings = rloo_settings(config, variant)

    with atomic_dir(folder) as tmp:

        class Checkpoints(TrainerCallback):
            """The policy's weights at each trajectory step, and each step's seconds."""

            def __init__(self):
                self.ends = [time.perf_counter()]

            def on_step_end(self, args, state, control, model=None, **kwargs):
                self.ends.append(time.perf_counter())
                if state.global_step in steps:
                    weights = {k: v.detach().float().cpu().clone() for k, v in model_state(model).items()}
                    save_tensors(tmp / f"step_{state.global_step}.safetensors", weights)

        clock = Checkpoints()
        args = RLOOConfig(
            output_dir=str(tmp / "trainer"), **settings, use_cpu=config.torch_device == "cpu", bf16=False,
            report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=False,
            activation_checkpointing=checkpoints_gradients(config, torch.device(config.torch_device)),
            model_init_kwargs={"dtype": "float32", "trust_remote_code": config.trust_remote_code},
        )  # fmt: skip
        dataset = Dataset.from_dict({"prompt": [p.text for p in rows], "index": list(range(len(rows)))})
        with global_rng_kept():  # HF's Trainer seeds the global RNGs with `seed`
            trainer = RLOOTrainer(
                model=policy_path, reward_funcs=reward, args=args, processing_class=tokenizer,
                train_dataset=dataset, callbacks=[clock],
            )  # fmt: skip
            trainer.train()
        seconds = [b - a for a, b in zip(clock.ends, clock.ends[1:], strict=False)]
        metrics = {
            "trl_version": trl.__version__, "settings": settings, "steps": len(seconds),
            "seconds_training": sum(seconds), "seconds": time.perf_counter() - started,
            "median_step_seconds": sorted(seconds)[len(seconds) // 2] if seconds else 0.0,
        }  # fmt: skip
        shutil.rmtree(tmp / "trainer", ignore_errors=True)
        write_json(tmp / METRICS, metrics)
    return metrics
