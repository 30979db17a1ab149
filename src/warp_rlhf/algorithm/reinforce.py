"""One REINFORCE step of WARP, with its anchor (paper Algorithm 1, inner loop; App. B.3).

    θ_m ← θ_init ; θ_m^ema ← θ_init ; fresh optimiser                 `Trainer.start`
    for t in 1..T:                                                     `run_loop.train_run`
      collect:  x_1..B ~ X ; y_b ~ π_θm(·|x_b) ; r(x_b, y_b) ; ℓ_b^ema = log π_ema(y_b|x_b)
      update:   r_β,b = r(x_b, y_b) − β (ℓ_b − ℓ_b^ema)            detached: a reward, not a loss term
                A_b   = r_β,b − baseline_b                          baseline 0 in the paper
                loss  = − mean_b A_b · ℓ_b                           REINFORCE
                AdamW step on θ_m ; θ_m^ema ← (1 − μ) θ_m^ema + μ θ_m

`collect` returns a `Trajectory`, `update` an `UpdateStats`, `step` (both) a `StepMetrics`. The
REINFORCE baseline of the paper's comparisons is the same run with μ = 0: its anchor stays at
θ_init = θ_sft. Each step's randomness is one `torch.Generator` seeded from (seed, iteration,
run, step): sampling draws from it, then LoRA's dropout continues its stream. A resumed run
therefore draws exactly what an uninterrupted one would, its final weights are bitwise equal,
and the process's global RNG is left as it was.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from warp_rlhf import policy as pi
from warp_rlhf.algorithm import lora
from warp_rlhf.algorithm.merge import State, copy_into, ema_update_, model_state
from warp_rlhf.checkpoint import load_tensors
from warp_rlhf.config import WarpConfig
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


RewardFn = Callable[[list[Prompt], list[str], list[list[int]]], torch.Tensor]
"""r(x, y): (prompts, completions, completion_ids) → one score per completion."""


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
    completions: list[str] = field(default_factory=list)  # y_b, decoded
    rewards: dict[str, torch.Tensor] = field(default_factory=dict)  # each r_k(x_b, y_b) where the reward names them


@dataclass(frozen=True)
class Completions:
    """One step's prompts, completions and rewards: the table of `log_completions`, as TRL logs it."""

    step: int  # t, from 1
    prompts: list[str]
    completions: list[str]
    reward: list[float]  # r(x_b, y_b)
    rewards: dict[str, list[float]]  # each r_k by name where r sums several (NaN: r_k does not apply there)

    @staticmethod
    def of(step: int, trajectory: Trajectory) -> Completions:
        named = trajectory.rewards if len(trajectory.rewards) > 1 else {}
        return Completions(
            step,
            [prompt.text for prompt in trajectory.prompts],
            trajectory.completions,
            trajectory.score.tolist(),
            {key: values.tolist() for key, values in named.items()},
        )

    def rows(self) -> list[dict[str, Any]]:
        """One row per completion: step, prompt, completion, reward, and reward_<k> for each r_k."""
        return [
            {"step": self.step, "prompt": prompt, "completion": completion, "reward": self.reward[b]}
            | {f"reward_{key}": values[b] for key, values in self.rewards.items()}
            for b, (prompt, completion) in enumerate(zip(self.prompts, self.completions, strict=True))
        ]


@dataclass(frozen=True)
class Advantages:
    """r_β and the advantages of some rows of a batch, from their ℓ (no gradient): `kl_advantages`."""

    reward_beta: torch.Tensor  # r_β = r − β (ℓ − ℓ_ema)
    advantage: torch.Tensor  # A = r_β − baseline
    kl: torch.Tensor  # ℓ − ℓ_ema, the k1 estimate of KL(π ‖ π_ema) per row

    def rows(self, rows: slice) -> Advantages:
        return Advantages(self.reward_beta[rows], self.advantage[rows], self.kl[rows])

    @staticmethod
    def cat(parts: list[Advantages]) -> Advantages:
        """The rows of consecutive parts, in order (one part: itself)."""
        if len(parts) == 1:
            return parts[0]
        return Advantages(
            torch.cat([part.reward_beta for part in parts]),
            torch.cat([part.advantage for part in parts]),
            torch.cat([part.kl for part in parts]),
        )


@dataclass(frozen=True)
class UpdateStats:
    """What `update` did to the policy."""

    loss: float  # − mean_b A_b ℓ_b, summed over micro-batches
    reward_beta_mean: float  # mean r_β
    kl_to_anchor: float  # mean ℓ − ℓ_ema, the k1 estimate of KL(π ‖ π_ema)
    entropy: float  # per-token entropy of π, nats
    grad_norm: float  # before clipping
    learning_rate: float


@dataclass(frozen=True)
class StepMetrics:
    """One step's line of a run's metrics.jsonl (`as_dict`, keys in this order)."""

    step: int  # t, from 1
    reward_mean: float  # mean r(x_b, y_b)
    reward_std: float
    kl_to_anchor: float
    reward_beta_mean: float
    loss: float
    grad_norm: float
    entropy: float
    completion_length: float  # mean tokens per completion, EOS included
    learning_rate: float
    tokens: int  # prompt and completion tokens of the batch, padding excluded
    completion_tokens: int
    seconds: float  # the whole step; then each phase's share (`PhaseClock`)
    seconds_generate: float
    seconds_reward: float
    seconds_anchor: float
    seconds_policy: float
    seconds_optimizer: float
    seconds_ema: float

    def as_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


def run_seed(config: WarpConfig) -> int:
    """The seed of the runs' prompt order and sampling: `train_seed`, else `seed`."""
    return config.seed if config.train_seed is None else config.train_seed


def prompt_batch(prompts: list[Prompt], config: WarpConfig, spec: RunSpec, step: int) -> list[Prompt]:
    """Step t's prompts: the next B / G of a run-specific, epoch-wise seeded order, each G times in
    a row (G = `num_generations`: a prompt's group of completions, consecutive rows of the batch)."""
    n, group, batch = len(prompts), config.num_generations, []
    per_step = config.batch_size // group
    for k in range(step * per_step, (step + 1) * per_step):
        epoch, position = divmod(k, n)
        order = list(range(n))
        random.Random(derived_seed(run_seed(config), spec.iteration, spec.run, "epoch", epoch)).shuffle(order)
        batch.extend([prompts[order[position]]] * group)
    return batch


def reward_beta(score: torch.Tensor, logp: torch.Tensor, logp_anchor: torch.Tensor, beta: float) -> torch.Tensor:
    """r_β = r − β (ℓ − ℓ_ema), from a detached ℓ: the KL-regularised reward, not a loss term."""
    return score.to(logp) - beta * (logp - logp_anchor.to(logp))


def advantages(r_beta: torch.Tensor, baseline: str, group: int = 1) -> torch.Tensor:
    """r_β − baseline: none (the paper); over the batch, its mean or the leave-one-out mean of the
    others; or per prompt, over its `group` consecutive rows (G completions): group_mean, the
    group's mean (GRPO's centring), or group_loo, the mean of the group's others (RLOO's baseline)."""
    if baseline == "none":
        return r_beta
    if baseline.startswith("group_"):
        return _centred(r_beta.view(-1, group), baseline.removeprefix("group_")).flatten()
    return _centred(r_beta, baseline)


def _centred(values: torch.Tensor, baseline: str) -> torch.Tensor:
    """values − their mean (`mean`) or the mean of the others (`loo`), along the last dimension."""
    if baseline == "mean":
        return values - values.mean(-1, keepdim=True)
    size = values.shape[-1]
    if size < 2:
        return torch.zeros_like(values)
    return values - (values.sum(-1, keepdim=True) - values) / (size - 1)


def kl_advantages(
    score: torch.Tensor, logp: torch.Tensor, logp_anchor: torch.Tensor, beta: float, baseline: str, group: int = 1
) -> Advantages:
    """r_β and A = r_β − baseline of rows with rewards `score`, detached ℓ `logp` and anchor ℓ
    `logp_anchor`: the whole batch for a baseline over it, whole groups of `group` rows for a
    baseline per prompt; any rows for the paper's (none)."""
    r_beta = reward_beta(score, logp, logp_anchor, beta)
    return Advantages(r_beta, advantages(r_beta, baseline, group), logp - logp_anchor.to(logp))


def autocast(config: WarpConfig, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast of the forward passes, on a GPU or a CPU, when `precision: bf16`; fp32
    otherwise. The weights, their gradients, AdamW's moments and the EMA anchor stay fp32: an
    update μ·(θ − θ_ema) far below bf16's resolution still moves the anchor. The CPU fast paths
    that multiply on fp32 oneDNN step aside under it (`warp_rlhf.cpu`)."""
    if config.precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def checkpoints_gradients(config: WarpConfig, device: torch.device) -> bool:
    """`gradient_checkpointing`, where null means on a GPU (TRL's default) and off on a CPU."""
    return device.type == "cuda" if config.gradient_checkpointing is None else config.gradient_checkpointing


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


class Trainer:
    """One policy, its anchor and the run's inputs: a REINFORCE step (`step`) and a run's start
    (`start`). `run_loop.train_run` composes them into a resumable run."""

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
        self.log_step = log_step  # e.g. a tracker: the run loop hands it each step's metrics
        self.completions: Completions | None = None  # the last step's, with `log_completions`
        self.anchor = copy.deepcopy(policy).eval().requires_grad_(False)
        self.lora = config.lora_r > 0  # then the policy is a copy with adapters; the caller's model stays plain
        self.policy = lora.add_adapters(copy.deepcopy(policy), config) if self.lora else policy
        self.policy.eval()  # no dropout (LoRA's own only in the training forward); gradients still flow
        self.policy_state, self.anchor_state = model_state(self.policy), model_state(self.anchor)
        self.device = next(policy.parameters()).device
        self.checkpointing = checkpoints_gradients(config, self.device)

    def weights(self) -> State:
        """The policy's weights as the plain model names them (LoRA's merged: W + (α/r)·B·A)."""
        return lora.merged_state(self.policy) if self.lora else self.policy_state

    def start(self, spec: RunSpec, init: Path | None) -> None:
        """θ_m ← θ_init ; θ_m^ema ← θ_init, from the safetensors file `init` (None: the policy as it
        is now); with LoRA, fresh adapters drawn from the run's seed."""
        start = load_tensors(init, self.device) if init is not None else self.weights()
        if self.lora:
            lora.reset_adapters(self.policy, derived_seed(run_seed(self.config), spec.iteration, spec.run, "lora"))
            start = {name: tensor.detach().clone() for name, tensor in start.items()}
            lora.load_base(self.policy, start)
        else:
            copy_into(self.policy, start)
        copy_into(self.anchor, start)

    # ---- one REINFORCE step --------------------------------------------------------------
    def step(self, spec: RunSpec, step: int, optimizer, scheduler) -> StepMetrics:
        """Step t of a run: `collect`, then `update`, on the step's own generator."""
        clock = PhaseClock(self.device)
        seed = derived_seed(run_seed(self.config), spec.iteration, spec.run, "step", step)
        generator = torch.Generator(self.device).manual_seed(seed)
        trajectory = self.collect(spec, step, clock, generator)
        self.completions = Completions.of(step + 1, trajectory) if self.config.log_completions else None
        where = f"{spec.name} step {step + 1}"
        stats = self.update(trajectory, optimizer, scheduler, spec.anchor_rate, clock, where, generator)
        score, rollout = trajectory.score, trajectory.rollout
        return StepMetrics(
            step=step + 1,
            reward_mean=score.mean().item(),
            reward_std=score.std().item() if score.numel() > 1 else 0.0,
            kl_to_anchor=stats.kl_to_anchor,
            reward_beta_mean=stats.reward_beta_mean,
            loss=stats.loss,
            grad_norm=stats.grad_norm,
            entropy=stats.entropy,
            completion_length=rollout.completion_lengths.float().mean().item(),
            learning_rate=stats.learning_rate,
            tokens=int(rollout.attention_mask.sum()),
            completion_tokens=int(rollout.completion_mask.sum()),
            seconds=clock.total(),
            **clock.seconds,
        )

    def collect(self, spec: RunSpec, step: int, clock: PhaseClock, generator: torch.Generator) -> Trajectory:
        """x_1..B ~ X, y_b ~ π_θ(·|x_b) at temperature τ (drawn from `generator`), r(x_b, y_b), and
        ℓ_b^ema under the anchor."""
        config = self.config
        prompts = prompt_batch(self.prompts, config, spec, step)
        with clock.phase("generate"), self._autocast():
            rollout = pi.sample(
                self.policy,
                self.tokenizer,
                [prompt.text for prompt in prompts],
                temperature=config.temperature,
                max_new_tokens=config.max_new_tokens,
                generator=generator,
            )
        with clock.phase("reward"):
            completions = pi.decode(self.tokenizer, rollout)
            try:
                score, each = self._score(prompts, completions, pi.token_ids(rollout))
            except TrainingError as error:
                raise TrainingError(f"{spec.name} step {step + 1}: {error}") from None
        if not torch.isfinite(score).all():
            raise TrainingError(f"{spec.name} step {step + 1}: the reward is not finite ({score.tolist()[:4]} …)")
        with clock.phase("anchor"):
            logp_anchor = self._no_grad_logp(self.anchor, self._micro_batches(rollout))
        return Trajectory(prompts, rollout, score, logp_anchor, completions, each)

    def _score(
        self, prompts: list[Prompt], completions: list[str], completion_ids: list[list[int]]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """r(x_b, y_b), and each r_k by name where the reward is a weighted sum that names them
        (it offers `each` and `total`, as `stages.rewards.Rewards`: r = total(each))."""
        if hasattr(self.reward, "each"):
            each = self.reward.each(prompts, completions, completion_ids)
            return self.reward.total(each).float(), each
        return self.reward(prompts, completions, completion_ids).float(), {}

    def update(
        self,
        trajectory: Trajectory,
        optimizer,
        scheduler,
        anchor_rate: float,
        clock: PhaseClock,
        where: str,
        generator: torch.Generator,
    ) -> UpdateStats:
        """r_β and the advantages, the REINFORCE loss's gradient over micro-batches, clip, AdamW
        step, EMA of the anchor. LoRA's dropout in the training forward continues `generator`."""
        config, rollout = self.config, trajectory.rollout
        parts = self._micro_batches(rollout)
        tokens = max(1, rollout.completion_mask.sum().item())
        with clock.phase("policy"), pi.drawing_from(generator):
            # 1. r_β and the advantages of the whole batch, which need ℓ of every row before the
            #    first backward: from one no-grad pass where a baseline spans several micro-batches;
            #    otherwise (one micro-batch, or the paper's baseline, none, where a row's A is its
            #    own r_β) from each micro-batch's training forward in 2., with no extra pass.
            batch = self._batch_advantages(trajectory, parts)
            # 2. the REINFORCE loss over micro-batches, −Σ_b A_b ℓ_b / B, its gradients accumulated.
            loss, entropy, terms = 0.0, 0.0, []
            for rows, part in parts:
                with lean_backward(self.policy), self._dropout(), pi.checkpointed(self.policy, self.checkpointing):
                    logp, token_entropy = self._sequence_logprobs(self.policy, part)
                    own = self._kl_advantages(trajectory, rows, logp.detach()) if batch is None else batch.rows(rows)
                    micro_loss = -(own.advantage * logp).sum() / config.batch_size
                    if not torch.isfinite(micro_loss):
                        raise TrainingError(f"{where}: the loss is not finite")
                    micro_loss.backward()
                loss += micro_loss.item()
                entropy += pi.mean_entropy(token_entropy, part) * part.completion_mask.sum().item() / tokens
                terms.append(own)
            whole = Advantages.cat(terms)
        with clock.phase("optimizer"):
            max_norm = config.max_grad_norm if config.max_grad_norm is not None else math.inf
            grad_norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), max_norm).item()
            learning_rate = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        with clock.phase("ema"):
            if anchor_rate > 0:  # θ_ema ← (1 − μ) θ_ema + μ θ, on the merged weights with LoRA
                ema_update_(*self._ema_pairs(), anchor_rate)
        return UpdateStats(
            loss=loss,
            reward_beta_mean=whole.reward_beta.mean().item(),
            kl_to_anchor=whole.kl.mean().item(),
            entropy=entropy,
            grad_norm=grad_norm,
            learning_rate=learning_rate,
        )

    def _batch_advantages(self, trajectory: Trajectory, parts: list[tuple[slice, pi.Rollout]]) -> Advantages | None:
        """The batch's r_β and A from a no-grad pass, where a baseline spans several micro-batches;
        None where the training forwards give them (a baseline per prompt whose groups each lie
        within one micro-batch included)."""
        config = self.config
        micro_batch = config.batch_size // config.grad_accumulation_steps
        within_groups = config.baseline.startswith("group_") and micro_batch % config.num_generations == 0
        if config.baseline == "none" or len(parts) == 1 or within_groups:
            return None
        return self._kl_advantages(trajectory, slice(None), self._no_grad_logp(self.policy, parts))

    def _kl_advantages(self, trajectory: Trajectory, rows: slice, logp: torch.Tensor) -> Advantages:
        config, score, logp_anchor = self.config, trajectory.score[rows], trajectory.logp_anchor[rows]
        return kl_advantages(score, logp, logp_anchor, config.beta, config.baseline, config.num_generations)

    def _no_grad_logp(self, model, parts: list[tuple[slice, pi.Rollout]]) -> torch.Tensor:
        """ℓ of every row under `model`, without a gradient (nor dropout), a micro-batch at a time."""
        with torch.no_grad():
            return torch.cat([self._sequence_logprobs(model, part)[0] for _, part in parts])

    def _dropout(self) -> contextlib.AbstractContextManager:
        return lora.adapter_dropout(self.policy) if self.lora else contextlib.nullcontext()

    def _ema_pairs(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(anchor tensors, the policy's): all of them, or with LoRA the adapted weights, merged
        (the others are frozen, equal in both, and stay so)."""
        if not self.lora:
            return list(self.anchor_state.values()), list(self.policy_state.values())
        with torch.no_grad():
            layers = lora.adapted(self.policy)
            merged = [lora.merged_weight(module) for module in layers.values()]
        return [self.anchor_state[f"{name}.weight"] for name in layers], merged

    def _micro_batches(self, rollout: pi.Rollout) -> list[tuple[slice, pi.Rollout]]:
        """The micro-batches of `grad_accumulation_steps`: (rows, their rollout)."""
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
