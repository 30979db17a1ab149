"""WARP, paper Algorithm 1 (Ramé et al., 2024, App. B.3), readable top to bottom.

    θ_init ← θ_sft
    for i in 1..I:
      for m in 1..M:                    reinforce_run: own seed, own prompt order
        θ_m, θ_m^ema ← θ_init; T REINFORCE steps with r_β = r − β(ℓ − ℓ_ema); EMA every step
      θ_slerp^i ← θ_init + SLERP(θ_1 − θ_init, …, θ_M − θ_init)
      θ_init ← (1 − η) θ_init + η θ_slerp^i                     LITI
    return θ_slerp^I

Output folder: iter_<i>/init.safetensors (θ_init, read when a run starts, never held while runs
train), iter_<i>/run_<m>/ (metrics.jsonl, checkpoint/, policy.safetensors, done.json written
last), iter_<i>/slerp.safetensors, final/ (`save_pretrained` + model card).
Randomness is derived from (seed, iteration, run, step), so a resumed run samples exactly what
an uninterrupted one would, and its final weights are bitwise equal.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from warp_rlhf import rollout
from warp_rlhf.activations import lean_backward
from warp_rlhf.checkpoint import (
    atomic_dir,
    load_tensors,
    read_json,
    remove_temporaries,
    save_tensors,
    write_json,
)
from warp_rlhf.config import WarpConfig, dump_config
from warp_rlhf.distributed import WorkerJob, run_in_processes, run_on_ray
from warp_rlhf.errors import WarpError
from warp_rlhf.merge import State, copy_into, ema_update_, liti, model_state, slerp_merge
from warp_rlhf.runtime import keep_freed_memory

RewardFn = Callable[[list[str], list[str]], torch.Tensor]
"""r(x, y): (prompts, completions) → one score per completion."""

DONE, POLICY, METRICS, CHECKPOINT = "done.json", "policy.safetensors", "metrics.jsonl", "checkpoint"
INIT, SLERP = "init.safetensors", "slerp.safetensors"


class TrainingError(WarpError):
    """Training cannot go on (a non-finite reward or loss); the last checkpoint is kept."""


def derived_seed(*parts: object) -> int:
    """A 63-bit seed that depends on every part (seed, iteration, run, step, …)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@dataclass(frozen=True)
class RunSpec:
    """One REINFORCE run of WARP: iteration i, run m (both from 1), and its folder."""

    iteration: int
    run: int
    folder: Path
    anchor_rate: float  # μ; 0 keeps the anchor fixed at θ_init (the REINFORCE baseline)

    @property
    def name(self) -> str:
        return f"iter {self.iteration} run {self.run}"


def prompt_batch(prompts: list[str], config: WarpConfig, spec: RunSpec, step: int) -> list[str]:
    """Step t's prompts: the next B of a run-specific, epoch-wise seeded order."""
    n, batch = len(prompts), []
    for k in range(step * config.batch_size, (step + 1) * config.batch_size):
        epoch, position = divmod(k, n)
        order = list(range(n))
        random.Random(derived_seed(config.seed, spec.iteration, spec.run, "epoch", epoch)).shuffle(order)
        batch.append(prompts[order[position]])
    return batch


def advantages(r_beta: torch.Tensor, baseline: str) -> torch.Tensor:
    """r_β − baseline: none (the paper), the batch mean, or the leave-one-out mean."""
    if baseline == "none":
        return r_beta
    if baseline == "mean":
        return r_beta - r_beta.mean()
    size = r_beta.numel()
    if size < 2:
        return torch.zeros_like(r_beta)
    return r_beta - (r_beta.sum() - r_beta) / (size - 1)


def autocast(config: WarpConfig, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast for forward passes on a GPU when `precision: bf16`; fp32 otherwise."""
    if config.precision == "bf16" and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def new_optimizer(policy: torch.nn.Module, config: WarpConfig):
    """Adam (AdamW without weight decay, as the paper) with linear warm-up to a constant rate."""
    from transformers import get_constant_schedule_with_warmup

    optimizer = torch.optim.AdamW(policy.parameters(), lr=config.learning_rate, weight_decay=0.0, fused=True)
    fresh = {
        index: {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
        for index, p in enumerate(policy.parameters())
    }
    optimizer.load_state_dict({"state": fresh, "param_groups": optimizer.state_dict()["param_groups"]})
    return optimizer, get_constant_schedule_with_warmup(optimizer, config.warmup_steps)


class PhaseClock:
    """Wall-clock seconds per phase of a step, as `seconds_<phase>` (the GPU is synchronised)."""

    def __init__(self, device: torch.device):
        self.device, self.started = device, time.perf_counter()
        self.last, self.seconds = self.started, {}

    def lap(self, phase: str) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        key = f"seconds_{phase}"
        self.seconds[key] = self.seconds.get(key, 0.0) + now - self.last
        self.last = now

    def total(self) -> float:
        return self.last - self.started


class Trainer:
    """Holds one policy, its anchor and an optimiser; runs REINFORCE runs one at a time."""

    def __init__(self, config: WarpConfig, policy, tokenizer, reward: RewardFn, prompts: list[str]):
        if not prompts:
            raise TrainingError("no RL prompts to train on")
        self.config, self.tokenizer, self.reward, self.prompts = config, tokenizer, reward, prompts
        self.policy = policy.eval()  # eval(): no dropout; gradients still flow
        self.anchor = copy.deepcopy(policy).eval().requires_grad_(False)
        self.policy_state, self.anchor_state = model_state(self.policy), model_state(self.anchor)
        self.device = next(policy.parameters()).device
        if self.device.type == "cpu":
            keep_freed_memory()
        self.autocast = lambda: autocast(self.config, self.device)

    # ---- one REINFORCE step ------------------------------------------------------------
    def step(self, spec: RunSpec, step: int, optimizer, scheduler) -> dict:
        """Sample, score, and take one policy-gradient step; then update the EMA anchor."""
        config, clock = self.config, PhaseClock(self.device)
        prompts = prompt_batch(self.prompts, config, spec, step)
        torch.manual_seed(derived_seed(config.seed, spec.iteration, spec.run, "step", step))
        try:
            with self.autocast():
                batch = rollout.sample(
                    self.policy,
                    self.tokenizer,
                    prompts,
                    temperature=config.temperature,
                    max_new_tokens=config.max_new_tokens,
                )
        except RuntimeError as error:  # torch.multinomial refuses inf / NaN probabilities
            if "inf" not in str(error) and "nan" not in str(error):
                raise
            raise TrainingError(f"{spec.name} step {step + 1}: the policy's probabilities are not finite") from None
        clock.lap("generate")
        score = self.reward(prompts, rollout.decode(self.tokenizer, batch)).float()
        clock.lap("reward")
        if not torch.isfinite(score).all():
            raise TrainingError(f"{spec.name} step {step + 1}: the reward is not finite ({score.tolist()[:4]} …)")
        size = config.batch_size // config.grad_accumulation_steps
        micro = [batch.rows(start, start + size) for start in range(0, config.batch_size, size)]

        def forward(model, part: rollout.Rollout) -> tuple[torch.Tensor, torch.Tensor | None]:
            """ℓ of each sequence, and with a gradient the per-token entropy (logged)."""
            with self.autocast():
                logprobs, entropy = rollout.completion_logprobs(
                    model, part, config.temperature, with_entropy=torch.is_grad_enabled()
                )
            return (logprobs * part.completion_mask).sum(-1), entropy

        with torch.no_grad():
            logp_anchor = torch.cat([forward(self.anchor, part)[0] for part in micro])
        clock.lap("anchor")

        def reward_beta(rows: slice, logp_values: torch.Tensor) -> torch.Tensor:
            """r_β = r − β (ℓ − ℓ^ema), from detached ℓ: a reward, not a loss term."""
            return score[rows].to(logp_values) - config.beta * (logp_values - logp_anchor[rows].to(logp_values))

        # Each ℓ comes from its own training forward. Only a batch-wide baseline over several
        # micro-batches needs every ℓ before the first backward: then a no-grad pass gives them.
        whole_batch_first = config.baseline != "none" and len(micro) > 1
        if whole_batch_first:
            with torch.no_grad():
                logp_first = torch.cat([forward(self.policy, part)[0] for part in micro])
            advantage_first = advantages(reward_beta(slice(None), logp_first), config.baseline)
        kls, rewards_beta, loss_total, entropy = [], [], 0.0, 0.0
        for index, part in enumerate(micro):
            rows = slice(index * size, (index + 1) * size)
            with lean_backward(self.policy):  # its forward and backward
                logp, token_entropy = forward(self.policy, part)
                share = part.completion_mask.sum().item() / max(1, batch.completion_mask.sum().item())
                entropy += rollout.mean_entropy(token_entropy, part) * share  # a per-token mean over the batch
                logp_values = logp_first[rows] if whole_batch_first else logp.detach()
                r_beta = reward_beta(rows, logp_values)
                # baseline 'none' is per sample; otherwise this micro-batch is the whole batch
                advantage = advantage_first[rows] if whole_batch_first else advantages(r_beta, config.baseline)
                loss = -(advantage * logp).sum() / config.batch_size
                if not torch.isfinite(loss):
                    raise TrainingError(f"{spec.name} step {step + 1}: the loss is not finite")
                loss.backward()  # REINFORCE: ∇ of −mean_b (r_β,b − baseline_b) ℓ_b
            loss_total += loss.item()
            kls.append(logp_values - logp_anchor[rows].to(logp_values))
            rewards_beta.append(r_beta)
        kl, r_beta = torch.cat(kls), torch.cat(rewards_beta)
        clock.lap("policy")
        max_norm = config.max_grad_norm if config.max_grad_norm is not None else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), max_norm).item()
        learning_rate = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        clock.lap("optimizer")
        if spec.anchor_rate > 0:
            ema_update_(self.anchor_state.values(), self.policy_state.values(), spec.anchor_rate)
        clock.lap("ema")
        lengths = batch.completion_lengths.float()
        return {
            "step": step + 1,
            "reward_mean": score.mean().item(),
            "reward_std": score.std().item() if score.numel() > 1 else 0.0,
            "kl_to_anchor": kl.mean().item(),
            "reward_beta_mean": r_beta.mean().item(),
            "loss": loss_total,
            "grad_norm": grad_norm,
            "entropy": entropy,
            "completion_length": lengths.mean().item(),
            "learning_rate": learning_rate,
            "tokens": int(batch.attention_mask.sum()),
            "completion_tokens": int(batch.completion_mask.sum()),
            "seconds": clock.total(),
            **clock.seconds,
        }

    # ---- one run, resumable ------------------------------------------------------------
    def run(
        self,
        spec: RunSpec,
        init: Path | None,
        steps: int,
        snapshots: frozenset[int] = frozenset(),
        bar: int | None = None,
    ) -> None:
        """T steps from θ_init with a fresh optimiser; leaves policy.safetensors and done.json.

        θ_init is read from the safetensors file `init` when the run starts (None: the policy as
        it is now), so no copy of it stays in memory while the run trains. After each step k in
        `snapshots`, the policy is also saved as step_<k>.safetensors. `bar`: the terminal line of
        its progress bar, for runs side by side.
        """
        folder = spec.folder
        remove_temporaries(folder)
        if (folder / DONE).exists():
            return
        folder.mkdir(parents=True, exist_ok=True)
        optimizer, scheduler = new_optimizer(self.policy, self.config)
        start = self._restore(folder / CHECKPOINT, init, optimizer, scheduler)
        log_path = folder / METRICS
        _truncate_lines(log_path, start)
        progress = tqdm(total=steps, initial=start, desc=spec.name, unit="step", dynamic_ncols=True, position=bar)
        with progress, open(log_path, "a") as log:
            for step in range(start, steps):
                metrics = self.step(spec, step, optimizer, scheduler)
                log.write(json.dumps(metrics) + "\n")
                log.flush()
                progress.set_postfix(reward=f"{metrics['reward_mean']:.3f}", kl=f"{metrics['kl_to_anchor']:.3f}")
                progress.update()
                if step + 1 in snapshots:
                    save_tensors(folder / f"step_{step + 1}.safetensors", self.policy_state)
                if (step + 1) % self.config.checkpoint_every == 0 and step + 1 < steps:
                    self._save(folder / CHECKPOINT, step + 1, optimizer, scheduler)
        save_tensors(folder / POLICY, self.policy_state)
        write_json(folder / DONE, {"steps": steps, **_summary(log_path)})
        shutil.rmtree(folder / CHECKPOINT, ignore_errors=True)

    def _save(self, path: Path, step: int, optimizer, scheduler) -> None:
        state = optimizer.state_dict()
        moments = {f"{index}.{key}": value for index, entry in state["state"].items() for key, value in entry.items()}
        with atomic_dir(path) as tmp:
            save_tensors(tmp / "policy.safetensors", self.policy_state)
            save_tensors(tmp / "anchor.safetensors", self.anchor_state)
            save_tensors(tmp / "optimizer.safetensors", moments)
            write_json(
                tmp / "state.json",
                {"step": step, "param_groups": state["param_groups"], "scheduler": scheduler.state_dict()},
            )

    def _restore(self, path: Path, init: Path | None, optimizer, scheduler) -> int:
        """Load the run's checkpoint if there is one; else start from θ_init. Returns the step."""
        device = next(self.policy.parameters()).device
        if not (path / "state.json").exists():
            start = load_tensors(init, device) if init is not None else self.policy_state
            copy_into(self.policy, start)
            copy_into(self.anchor, start)
            return 0
        copy_into(self.policy, load_tensors(path / "policy.safetensors", device))
        copy_into(self.anchor, load_tensors(path / "anchor.safetensors", device))
        saved = read_json(path / "state.json")
        moments: dict[int, dict] = {}
        for key, value in load_tensors(path / "optimizer.safetensors", device).items():
            index, name = key.split(".", 1)
            moments.setdefault(int(index), {})[name] = value.cpu() if name == "step" else value
        optimizer.load_state_dict({"state": moments, "param_groups": saved["param_groups"]})
        scheduler.load_state_dict(saved["scheduler"])
        return saved["step"]


def _truncate_lines(path: Path, keep: int) -> None:
    """Keep the first `keep` lines (steps after the checkpoint are redone)."""
    if path.exists():
        lines = path.read_text().splitlines(keepends=True)[:keep]
        path.write_text("".join(lines))


def _summary(log_path: Path) -> dict:
    rows = [json.loads(line) for line in log_path.read_text().splitlines()]
    if not rows:
        return {}
    tenth = max(1, len(rows) // 10)
    first, last = rows[:tenth], rows[-tenth:]

    def mean(part, key):
        return sum(r[key] for r in part) / len(part)

    return {
        "reward_first_10pct": mean(first, "reward_mean"),
        "reward_last_10pct": mean(last, "reward_mean"),
        "kl_to_anchor_last_10pct": mean(last, "kl_to_anchor"),
        "seconds_per_step": mean(rows, "seconds"),
    }


def _run_files(folders: list[Path]) -> Callable[[int, str], torch.Tensor]:
    handles = [safe_open(str(folder / POLICY), framework="pt") for folder in folders]
    return lambda m, name: handles[m].get_tensor(name)


def train_warp(
    config: WarpConfig,
    policy,
    tokenizer,
    reward: RewardFn,
    prompts: list[str],
    out: Path,
    job: WorkerJob | None = None,
) -> tuple[State, list[dict]]:
    """Algorithm 1. Returns θ_slerp^I (on CPU) and one summary per iteration.

    With `backend: processes` or `ray` the runs of an iteration are processes or Ray tasks rebuilt
    from `job` (`distributed`).
    """
    if config.backend != "local" and job is None:
        raise WarpError(
            f"backend: {config.backend} needs the policy and reward-model folders: use warp_rlhf.pipeline.train_stage"
        )
    trainer = Trainer(config, policy, tokenizer, reward, prompts) if config.backend == "local" else None
    first_init = out / "iter_1" / INIT
    if not first_init.exists():
        save_tensors(first_init, model_state(policy))  # θ_init ← θ_sft
    summaries = []
    for iteration in range(1, config.iterations + 1):
        folder = out / f"iter_{iteration}"
        init_path, merged_path = folder / INIT, folder / SLERP
        remove_temporaries(folder)
        specs = [RunSpec(iteration, m, folder / f"run_{m}", config.ema_rate) for m in range(1, config.runs + 1)]
        if not merged_path.exists():
            pending = [spec for spec in specs if not (spec.folder / DONE).exists()]
            if trainer is None:
                run_side_by_side = run_on_ray if config.backend == "ray" else run_in_processes
                run_side_by_side(config, job, pending, init_path)
            else:
                for spec in pending:
                    trainer.run(spec, init_path, config.steps)
            merged = slerp_merge(
                load_tensors(init_path),
                _run_files([s.folder for s in specs]),
                config.runs,
                config.resolved_slerp_lambda,
            )
            save_tensors(merged_path, merged)
            del merged
        summaries.append({"iteration": iteration, "runs": [read_json(s.folder / DONE) for s in specs]})
        next_init = out / f"iter_{iteration + 1}" / INIT
        if iteration < config.iterations and not next_init.exists():
            save_tensors(next_init, liti(load_tensors(init_path), load_tensors(merged_path), config.liti_rate))
    return load_tensors(out / f"iter_{config.iterations}" / SLERP), summaries


def trajectory_steps(config: WarpConfig) -> list[int]:
    """The baseline's evaluated steps: `trajectory_points` evenly spaced, ending at I·M·T."""
    total = config.iterations * config.runs * config.steps
    return sorted({max(1, round(total * k / config.trajectory_points)) for k in range(1, config.trajectory_points + 1)})


def trajectory_files(config: WarpConfig, folder: Path) -> list[tuple[int, Path]]:
    steps = trajectory_steps(config)
    return [(k, folder / f"step_{k}.safetensors") for k in steps[:-1]] + [(steps[-1], folder / POLICY)]


def train_reinforce(
    config: WarpConfig, policy, tokenizer, reward: RewardFn, prompts: list[str], out: Path
) -> list[tuple[int, Path]]:
    """The baseline: one REINFORCE run with its anchor fixed at θ_sft, for I·M·T steps.

    Same rollout and step code as WARP; `trajectory_points` evenly spaced policies are kept.
    Returns (step, weights file) along the trajectory, the last being the end of training.
    """
    trainer = Trainer(config, policy, tokenizer, reward, prompts)
    total = config.iterations * config.runs * config.steps
    points = sorted(
        {max(1, round(total * k / config.trajectory_points)) for k in range(1, config.trajectory_points + 1)}
    )
    trainer.run(RunSpec(0, 1, out, anchor_rate=0.0), None, total, snapshots=frozenset(points[:-1]))
    return trajectory_files(config, out)


def save_policy(policy, tokenizer, state: State, folder: Path, config: WarpConfig, metrics: dict) -> None:
    """`save_pretrained` of the policy with `state`, its tokenizer and a model card, atomically."""
    copy_into(policy, {name: t.to(next(policy.parameters()).device) for name, t in state.items()})
    with atomic_dir(folder) as tmp:
        policy.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / "training_metrics.json", metrics)
        (tmp / "README.md").write_text(model_card(config, metrics))


def model_card(config: WarpConfig, metrics: dict) -> str:
    return (
        "---\nlibrary_name: transformers\ntags: [warp, rlhf, reinforce]\n---\n\n"
        "# WARP policy\n\n"
        "Trained with [warp-rlhf](https://arxiv.org/abs/2406.16768): Weight Averaged Rewarded Policies "
        f"(I={config.iterations}, M={config.runs}, T={config.steps}, μ={config.ema_rate}, "
        f"λ={config.resolved_slerp_lambda:g}, η={config.liti_rate}, β={config.beta}).\n\n"
        "```python\nfrom transformers import AutoModelForCausalLM\n"
        "model = AutoModelForCausalLM.from_pretrained(PATH)\n```\n\n"
        f"## Config\n\n```yaml\n{dump_config(config)}```\n\n"
        f"## Training metrics\n\n```json\n{json.dumps(metrics, indent=2)}\n```\n"
    )
