"""One REINFORCE run of WARP, with its anchor (paper Algorithm 1, inner loop; App. B.3).

    θ_m ← θ_init ; θ_m^ema ← θ_init ; fresh optimiser
    for t in 1..T:
      collect:  x_1..B ~ X ; y_b ~ π_θm(·|x_b) ; r(x_b, y_b) ; ℓ_b^ema = log π_ema(y_b|x_b)
      update:   r_β,b = r(x_b, y_b) − β (ℓ_b − ℓ_b^ema)            detached: a reward, not a loss term
                loss  = − mean_b (r_β,b − baseline_b) · ℓ_b          REINFORCE; baseline 0 in the paper
                AdamW step on θ_m ; θ_m^ema ← (1 − μ) θ_m^ema + μ θ_m

`collect` returns a `Trajectory`, `update` an `UpdateStats`. The REINFORCE baseline of the
paper's comparisons is the same run with μ = 0: its anchor stays at θ_init = θ_sft.
Randomness is derived from (seed, iteration, run, step), so a resumed run samples exactly what
an uninterrupted one would, and its final weights are bitwise equal.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from warp_rlhf import policy as pi
from warp_rlhf.algorithm import lora
from warp_rlhf.algorithm.merge import State, copy_into, ema_update_, model_state
from warp_rlhf.checkpoint import (
    UnreadableFile,
    atomic_dir,
    load_tensors,
    read_json,
    remove_temporaries,
    save_tensors,
    write_json,
)
from warp_rlhf.config import RUN_FIELDS, WarpConfig
from warp_rlhf.cpu import lean_backward
from warp_rlhf.errors import WarpError
from warp_rlhf.layout import RunFolder


@dataclass(frozen=True)
class Prompt:
    """One prompt x. `text` is what the policy continues (a chat template already applied); `raw` is
    the prompt as its dataset holds it, a text or {role, content} messages (None: `text`), and
    `columns` the rest of its row: TRL hands both to reward functions."""

    text: str
    raw: str | list[dict] | None = None
    columns: dict[str, Any] = field(default_factory=dict)

    @property
    def conversational(self) -> bool:
        return isinstance(self.raw, list)


RewardFn = Callable[[list[Prompt], list[str]], torch.Tensor]
"""r(x, y): (prompts, completions) → one score per completion."""


logger = logging.getLogger("warp_rlhf")


class TrainingError(WarpError):
    """Training cannot go on (a non-finite reward or loss); the last checkpoint is kept."""


def derived_seed(*parts: object) -> int:
    """A 63-bit seed that depends on every part (seed, iteration, run, step, …)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@dataclass(frozen=True)
class RunSpec:
    """One REINFORCE run: iteration i and run m (both from 1; the baseline is iteration 0), its
    folder, and its anchor's EMA rate μ (0 keeps the anchor fixed at θ_init)."""

    iteration: int
    run: int
    folder: RunFolder
    anchor_rate: float

    @property
    def name(self) -> str:
        return "REINFORCE baseline" if self.iteration == 0 else f"iter {self.iteration} run {self.run}"


@dataclass
class Trajectory:
    """One step's samples, none with a gradient: what `collect` gathers."""

    prompts: list[Prompt]
    rollout: pi.Rollout
    score: torch.Tensor  # r(x_b, y_b), (B,)
    logp_anchor: torch.Tensor  # ℓ_b^ema under the anchor, (B,)


@dataclass
class UpdateStats:
    """What `update` did to the policy."""

    loss: float  # − mean_b (r_β,b − baseline_b) ℓ_b, summed over micro-batches
    reward_beta_mean: float  # mean r_β
    kl_to_anchor: float  # mean ℓ − ℓ_ema, the k1 estimate of KL(π ‖ π_ema)
    entropy: float  # per-token entropy of π, nats
    grad_norm: float  # before clipping
    learning_rate: float


def run_seed(config: WarpConfig) -> int:
    """The seed of the runs' prompt order and sampling: `train_seed`, else `seed`."""
    return config.seed if config.train_seed is None else config.train_seed


def prompt_batch(prompts: list[Prompt], config: WarpConfig, spec: RunSpec, step: int) -> list[Prompt]:
    """Step t's prompts: the next B of a run-specific, epoch-wise seeded order."""
    n, batch = len(prompts), []
    for k in range(step * config.batch_size, (step + 1) * config.batch_size):
        epoch, position = divmod(k, n)
        order = list(range(n))
        random.Random(derived_seed(run_seed(config), spec.iteration, spec.run, "epoch", epoch)).shuffle(order)
        batch.append(prompts[order[position]])
    return batch


def reward_beta(score: torch.Tensor, logp: torch.Tensor, logp_anchor: torch.Tensor, beta: float) -> torch.Tensor:
    """r_β = r − β (ℓ − ℓ_ema), from a detached ℓ: the KL-regularised reward, not a loss term."""
    return score.to(logp) - beta * (logp - logp_anchor.to(logp))


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
    """Adam (AdamW without weight decay, as the paper) with linear warm-up to a constant rate.

    The moments are allocated here, not at the first step, so a run's memory peak is known from
    its start and a restored checkpoint fills the same tensors.
    """
    from transformers import get_constant_schedule_with_warmup

    trained = [p for p in policy.parameters() if p.requires_grad]  # with LoRA, the adapters alone
    optimizer = torch.optim.AdamW(trained, lr=config.learning_rate, weight_decay=0.0, fused=True)
    fresh = {
        index: {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
        for index, p in enumerate(trained)
    }
    optimizer.load_state_dict({"state": fresh, "param_groups": optimizer.state_dict()["param_groups"]})
    return optimizer, get_constant_schedule_with_warmup(optimizer, config.warmup_steps)


class PhaseClock:
    """Wall-clock seconds per phase of a step, as `seconds_<phase>` (a GPU is synchronised)."""

    def __init__(self, device: torch.device):
        self.device, self.started, self.seconds = device, time.perf_counter(), {}

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            key = f"seconds_{name}"
            self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - started

    def total(self) -> float:
        return time.perf_counter() - self.started


@dataclass
class _WholeBatch:
    logp: torch.Tensor  # ℓ of every row, no gradient
    advantage: torch.Tensor


class Trainer:
    """Holds one policy, its anchor and the run's inputs; runs REINFORCE runs one at a time."""

    def __init__(
        self,
        config: WarpConfig,
        policy,
        tokenizer,
        reward: RewardFn,
        prompts: list[Prompt],
        log_step: Callable[[RunSpec, dict], None] | None = None,
    ):
        if not prompts:
            raise TrainingError("no RL prompts to train on")
        self.config, self.tokenizer, self.reward, self.prompts = config, tokenizer, reward, prompts
        self.log_step = log_step  # e.g. a tracker; called with each step's metrics
        self.anchor = copy.deepcopy(policy).eval().requires_grad_(False)
        self.lora = config.lora_r > 0  # then the policy is a copy with adapters; the caller's model stays plain
        self.policy = lora.add_adapters(copy.deepcopy(policy), config) if self.lora else policy
        self.policy.eval()  # no dropout (LoRA's own only in the training forward); gradients still flow
        self.policy_state, self.anchor_state = model_state(self.policy), model_state(self.anchor)
        self.device = next(policy.parameters()).device

    def weights(self) -> State:
        """The policy's weights as the plain model names them (LoRA's merged: W + (α/r)·B·A)."""
        return lora.merged_state(self.policy) if self.lora else self.policy_state

    # ---- one REINFORCE step --------------------------------------------------------------
    def step(self, spec: RunSpec, step: int, optimizer, scheduler) -> dict:
        """Step t of a run: `collect`, then `update`; returns the step's metrics."""
        clock = PhaseClock(self.device)
        trajectory = self.collect(spec, step, clock)
        stats = self.update(trajectory, optimizer, scheduler, spec.anchor_rate, clock, f"{spec.name} step {step + 1}")
        score, rollout = trajectory.score, trajectory.rollout
        return {
            "step": step + 1,
            "reward_mean": score.mean().item(),
            "reward_std": score.std().item() if score.numel() > 1 else 0.0,
            "kl_to_anchor": stats.kl_to_anchor,
            "reward_beta_mean": stats.reward_beta_mean,
            "loss": stats.loss,
            "grad_norm": stats.grad_norm,
            "entropy": stats.entropy,
            "completion_length": rollout.completion_lengths.float().mean().item(),
            "learning_rate": stats.learning_rate,
            "tokens": int(rollout.attention_mask.sum()),
            "completion_tokens": int(rollout.completion_mask.sum()),
            "seconds": clock.total(),
            **clock.seconds,
        }

    def collect(self, spec: RunSpec, step: int, clock: PhaseClock) -> Trajectory:
        """x_1..B ~ X, y_b ~ π_θ(·|x_b) at temperature τ, r(x_b, y_b), and ℓ_b^ema under the anchor."""
        config = self.config
        prompts = prompt_batch(self.prompts, config, spec, step)
        torch.manual_seed(derived_seed(run_seed(config), spec.iteration, spec.run, "step", step))
        with clock.phase("generate"), self._autocast():
            rollout = pi.sample(
                self.policy,
                self.tokenizer,
                [prompt.text for prompt in prompts],
                temperature=config.temperature,
                max_new_tokens=config.max_new_tokens,
            )
        with clock.phase("reward"):
            try:
                score = self.reward(prompts, pi.decode(self.tokenizer, rollout)).float()
            except TrainingError as error:
                raise TrainingError(f"{spec.name} step {step + 1}: {error}") from None
        if not torch.isfinite(score).all():
            raise TrainingError(f"{spec.name} step {step + 1}: the reward is not finite ({score.tolist()[:4]} …)")
        with clock.phase("anchor"), torch.no_grad():
            parts = self._micro_batches(rollout)
            logp_anchor = torch.cat([self._sequence_logprobs(self.anchor, part)[0] for _, part in parts])
        return Trajectory(prompts, rollout, score, logp_anchor)

    def update(
        self, trajectory: Trajectory, optimizer, scheduler, anchor_rate: float, clock: PhaseClock, where: str
    ) -> UpdateStats:
        """r_β, advantage and the REINFORCE loss's gradient; clip, AdamW step; EMA of the anchor."""
        with clock.phase("policy"):
            loss, entropy, r_beta, kl = self._policy_gradient(trajectory, where)
        with clock.phase("optimizer"):
            max_norm = self.config.max_grad_norm if self.config.max_grad_norm is not None else math.inf
            grad_norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), max_norm).item()
            learning_rate = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        with clock.phase("ema"):
            if anchor_rate > 0:  # θ_ema ← (1 − μ) θ_ema + μ θ, on the merged weights with LoRA
                ema_update_(*self._ema_pairs(), anchor_rate)
        return UpdateStats(loss, r_beta.mean().item(), kl.mean().item(), entropy, grad_norm, learning_rate)

    def _ema_pairs(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(anchor tensors, the policy's): all of them, or with LoRA the adapted weights, merged
        (the others are frozen, equal in both, and stay so)."""
        if not self.lora:
            return list(self.anchor_state.values()), list(self.policy_state.values())
        with torch.no_grad():
            layers = lora.adapted(self.policy)
            merged = [lora.merged_weight(module) for module in layers.values()]
        return [self.anchor_state[f"{name}.weight"] for name in layers], merged

    def _policy_gradient(self, trajectory: Trajectory, where: str) -> tuple[float, float, torch.Tensor, torch.Tensor]:
        """Accumulate ∇ of −mean_b (r_β,b − baseline_b) ℓ_b over the micro-batches.

        Each micro-batch's ℓ comes from its own training forward, and with the paper's baseline
        (none) its r_β needs nothing else. Returns (loss, entropy, r_β, ℓ − ℓ_ema).
        """
        config, rollout = self.config, trajectory.rollout
        parts = self._micro_batches(rollout)
        whole = self._whole_batch(trajectory, parts) if config.baseline != "none" and len(parts) > 1 else None
        tokens = max(1, rollout.completion_mask.sum().item())
        loss_total, entropy, rewards_beta, kls = 0.0, 0.0, [], []
        dropout = lora.adapter_dropout(self.policy) if self.lora else contextlib.nullcontext()
        for rows, part in parts:
            with lean_backward(self.policy), dropout:  # its forward and backward
                logp, token_entropy = self._sequence_logprobs(self.policy, part)
                share = part.completion_mask.sum().item() / tokens
                entropy += pi.mean_entropy(token_entropy, part) * share  # a per-token mean over the batch
                logp_values = logp.detach() if whole is None else whole.logp[rows]
                r_beta = reward_beta(trajectory.score[rows], logp_values, trajectory.logp_anchor[rows], config.beta)
                advantage = advantages(r_beta, config.baseline) if whole is None else whole.advantage[rows]
                loss = -(advantage * logp).sum() / config.batch_size
                if not torch.isfinite(loss):
                    raise TrainingError(f"{where}: the loss is not finite")
                loss.backward()  # REINFORCE: ∇ of −mean_b (r_β,b − baseline_b) ℓ_b
            loss_total += loss.item()
            kls.append(logp_values - trajectory.logp_anchor[rows].to(logp_values))
            rewards_beta.append(r_beta)
        return loss_total, entropy, torch.cat(rewards_beta), torch.cat(kls)

    def _whole_batch(self, trajectory: Trajectory, parts: list[tuple[slice, pi.Rollout]]) -> _WholeBatch:
        """A batch-wide baseline (mean, loo) over several micro-batches needs every ℓ before the
        first backward: one no-grad pass gives them, and the advantages of the whole batch."""
        with torch.no_grad():
            logp = torch.cat([self._sequence_logprobs(self.policy, part)[0] for _, part in parts])
        r_beta = reward_beta(trajectory.score, logp, trajectory.logp_anchor, self.config.beta)
        return _WholeBatch(logp, advantages(r_beta, self.config.baseline))

    def _micro_batches(self, rollout: pi.Rollout) -> list[tuple[slice, pi.Rollout]]:
        batch = self.config.batch_size
        size = batch // self.config.grad_accumulation_steps
        return [(slice(start, start + size), rollout.rows(start, start + size)) for start in range(0, batch, size)]

    def _sequence_logprobs(self, model, part: pi.Rollout) -> tuple[torch.Tensor, torch.Tensor | None]:
        """ℓ of each sequence, and with a gradient the per-token entropy (logged)."""
        with self._autocast():
            logprobs, entropy = pi.completion_logprobs(
                model, part, self.config.temperature, with_entropy=torch.is_grad_enabled()
            )
        return (logprobs * part.completion_mask).sum(-1), entropy

    def _autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.config, self.device)

    # ---- one run, resumable --------------------------------------------------------------
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
        `snapshots`, the policy is also saved (`RunFolder.snapshot`). `bar`: the terminal line of
        its progress bar, for runs side by side.
        """
        files = spec.folder
        remove_temporaries(files.path)
        if files.done.exists():
            return
        files.path.mkdir(parents=True, exist_ok=True)
        optimizer, scheduler = new_optimizer(self.policy, self.config)
        try:
            start = self._restore(spec, init, optimizer, scheduler, steps)
        except UnreadableFile as error:
            remedy = (
                f"delete {files.checkpoint} and run again with --resume to restart this run from its init"
                if error.path.parent == files.checkpoint
                else "delete it and run again with --resume to write it anew"
            )
            raise TrainingError(f"{spec.name}: {error}; {remedy}") from None
        _truncate_lines(files.metrics, start)
        progress = tqdm(total=steps, initial=start, desc=spec.name, unit="step", dynamic_ncols=True, position=bar)
        with progress, open(files.metrics, "a") as log:
            for step in range(start, steps):
                metrics = self.step(spec, step, optimizer, scheduler)
                log.write(json.dumps(metrics) + "\n")
                log.flush()
                if self.log_step is not None:
                    self.log_step(spec, metrics)
                progress.set_postfix(reward=f"{metrics['reward_mean']:.3f}", kl=f"{metrics['kl_to_anchor']:.3f}")
                progress.update()
                if step + 1 in snapshots:
                    save_tensors(files.snapshot(step + 1), self.weights())
                if (step + 1) % self.config.checkpoint_every == 0 and step + 1 < steps:
                    self._save(files.checkpoint, step + 1, optimizer, scheduler)
        save_tensors(files.policy, self.weights())
        write_json(files.done, {"steps": steps, **_summary(files.metrics)})
        shutil.rmtree(files.checkpoint, ignore_errors=True)

    def _save(self, path: Path, step: int, optimizer, scheduler) -> None:
        state = optimizer.state_dict()
        moments = {f"{index}.{key}": value for index, entry in state["state"].items() for key, value in entry.items()}
        with atomic_dir(path) as tmp:
            save_tensors(tmp / "policy.safetensors", self.policy_state)
            save_tensors(tmp / "anchor.safetensors", self.anchor_state)
            save_tensors(tmp / "optimizer.safetensors", moments)
            write_json(
                tmp / "state.json",
                {
                    "step": step,
                    "param_groups": state["param_groups"],
                    "scheduler": scheduler.state_dict(),
                    "fields": self._run_fields(),
                },
            )

    def _run_fields(self) -> dict:
        return {name: getattr(self.config, name) for name in RUN_FIELDS}

    def _restore(self, spec: RunSpec, init: Path | None, optimizer, scheduler, steps: int) -> int:
        """Load the run's checkpoint if there is one and it was made with this run's settings (a
        checkpoint of other settings is set aside: the run restarts from θ_init). Returns the step."""
        path = spec.folder.checkpoint
        if self.lora:  # fresh adapters, drawn from the run's seed (a checkpoint overwrites them)
            lora.reset_adapters(self.policy, derived_seed(run_seed(self.config), spec.iteration, spec.run, "lora"))
        if (path / "state.json").exists():
            saved = read_json(path / "state.json")
            made_with = saved.get("fields", self._run_fields()) | {"steps": max(saved["step"], steps)}
            current = self._run_fields() | {"steps": steps}  # a checkpoint past the run's end is not resumed
            changed = [name for name, value in current.items() if made_with.get(name, value) != value]
            if changed:
                name, aside = changed[0], path.with_name(f"{path.name}.previous")
                logger.warning(
                    "%s: its checkpoint was made with %s=%r, not %r: restarting the run from its init "
                    "(the checkpoint is kept as %s)",
                    spec.name, name, made_with[name], current[name], aside,
                )  # fmt: skip
                shutil.rmtree(aside, ignore_errors=True)
                os.replace(path, aside)
        if not (path / "state.json").exists():
            start = load_tensors(init, self.device) if init is not None else self.weights()
            if self.lora:
                start = {name: tensor.detach().clone() for name, tensor in start.items()}
                lora.load_base(self.policy, start)
            else:
                copy_into(self.policy, start)
            copy_into(self.anchor, start)
            return 0
        copy_into(self.policy, load_tensors(path / "policy.safetensors", self.device))
        copy_into(self.anchor, load_tensors(path / "anchor.safetensors", self.device))
        saved = read_json(path / "state.json")
        moments: dict[int, dict] = {}
        for key, value in load_tensors(path / "optimizer.safetensors", self.device).items():
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
