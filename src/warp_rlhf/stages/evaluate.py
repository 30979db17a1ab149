"""Evaluation on held-out prompts: reward, judge, and KL(π ‖ π_sft) with standard errors.

Every policy is sampled on the same prompts with the same seeds. For each completion y ~ π:
- k1            = Σ_t [log π(y_t|·) − log π_sft(y_t|·)]                 (unbiased, can be < 0)
- exact-per-token = Σ_t KL(π(·|x, y_<t) ‖ π_sft(·|x, y_<t)) over the vocabulary (unbiased, ≥ 0)
Both use the sampling distribution softmax(logits / τ); the policy's logits are those of
generation itself, the SFT policy's come from one forward. Standard errors are std / sqrt(n)
(sample std, ddof = 1) over prompts.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from warp_rlhf import policy as pi
from warp_rlhf.algorithm.reinforce import Prompt, derived_seed
from warp_rlhf.checkpoint import write_json, write_text
from warp_rlhf.stages.compare import front_against_trajectory, mean_and_se
from warp_rlhf.stages.plots import plot_results
from warp_rlhf.stages.rewards import Rewards

Judge = Callable[[list[Prompt], list[str]], list[float]]
"""An independent score of each completion, never optimised (VADER for sentiment, or any reward)."""

EVAL_BATCH = 50


def token_kl(logits: torch.Tensor, reference_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ_t KL(softmax(logits_t) ‖ softmax(reference_t)) over masked positions, shape (B,)."""
    logp, logq = torch.log_softmax(logits, -1), torch.log_softmax(reference_logits, -1)
    per_token = (logp.exp() * (logp - logq)).sum(-1)
    return (per_token * mask).sum(-1)


def distinct_n(texts: list[str], n: int) -> float:
    """Distinct-n: unique word n-grams / all word n-grams over the completions."""
    grams = [tuple(words[i : i + n]) for words in (t.split() for t in texts) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


@dataclass
class Samples:
    """Per-prompt values of one policy. `rewards` holds each reward r_k when there are several
    (`reward` is their weighted total); `judge` is empty without a judge."""

    prompts: list[str] = field(default_factory=list)
    completions: list[str] = field(default_factory=list)
    reward: list[float] = field(default_factory=list)
    judge: list[float] = field(default_factory=list)
    kl_k1: list[float] = field(default_factory=list)
    kl_exact: list[float] = field(default_factory=list)
    length: list[float] = field(default_factory=list)
    rewards: dict[str, list[float]] = field(default_factory=dict)

    def summary(self) -> dict[str, float]:
        out: dict[str, float] = {"n_prompts": len(self.prompts)}
        for name in ("reward", "judge", "kl_k1", "kl_exact", "length"):
            if getattr(self, name):
                out[f"{name}_mean"], out[f"{name}_se"] = mean_and_se(getattr(self, name))
        for key, values in self.rewards.items():
            out[f"reward_{key}_mean"], out[f"reward_{key}_se"] = mean_and_se(values)
        out["distinct_1"] = distinct_n(self.completions, 1)
        out["distinct_2"] = distinct_n(self.completions, 2)
        return out


@torch.no_grad()
def sample_policy(
    policy,
    sft,
    tokenizer,
    prompts: list[Prompt],
    *,
    temperature: float,
    max_new_tokens: int,
    seed: int,
    rewards: Rewards,
    judge: Judge | None,
    batch_size: int = EVAL_BATCH,
) -> Samples:
    """Sample one completion per prompt from `policy` and score it against `sft` (may be `policy`)."""
    samples, device = Samples(), next(policy.parameters()).device
    for index, start in enumerate(range(0, len(prompts), batch_size)):
        chunk = prompts[start : start + batch_size]
        generator = torch.Generator(device).manual_seed(derived_seed(seed, "eval", index))  # the same for every policy
        batch, logits = pi.sample(
            policy,
            tokenizer,
            [p.text for p in chunk],
            temperature=temperature,
            max_new_tokens=max_new_tokens,
            generator=generator,
            with_logits=True,
        )  # fmt: skip  (the policy's logits come from generation itself: no second forward)
        reference = logits if sft is policy else pi.token_logits(sft, batch, temperature)
        k1 = pi.sequence_logprobs(logits, batch) - pi.sequence_logprobs(reference, batch)
        exact = token_kl(logits, reference, batch.completion_mask)
        completions = pi.decode(tokenizer, batch)
        each = rewards.each(chunk, completions, pi.token_ids(batch))
        samples.prompts += [p.text for p in chunk]
        samples.completions += completions
        samples.reward += rewards.total(each).tolist()
        if len(each) > 1:
            for key, values in each.items():
                samples.rewards.setdefault(key, []).extend(values.tolist())
        if judge is not None:
            samples.judge += list(judge(chunk, completions))
        samples.kl_k1 += k1.tolist()
        samples.kl_exact += exact.tolist()
        samples.length += batch.completion_lengths.float().tolist()
    return samples


def write_results(evaluated: dict[str, tuple[dict, Samples]], folder: Path, out: Path) -> dict:
    """eval/results.json, results.csv, completions.jsonl and the plots; returns the results."""
    policies = {name: {**samples.summary(), **meta} for name, (meta, samples) in evaluated.items()}
    results = {"policies": policies, "kl_in_plots": "kl_exact (exact-per-token estimator)"}
    matched = front_against_trajectory(evaluated)
    if matched is not None:
        results["matched_kl"] = matched
    write_json(folder / "results.json", results)
    columns = [c for c in next(iter(policies.values())) if c not in {"kind"}]
    table = io.StringIO()
    writer = csv.writer(table)
    writer.writerow(["policy", "kind", *columns])
    for name, row in policies.items():
        writer.writerow([name, row["kind"], *(row.get(c, "") for c in columns)])
    write_text(folder / "results.csv", table.getvalue())
    lines = [json.dumps({"policy": name} | row) for name, rows in completion_rows(evaluated).items() for row in rows]
    write_text(folder / "completions.jsonl", "\n".join(lines) + "\n")
    plot_results(policies, folder, out)
    return results


def completion_rows(evaluated: dict[str, tuple[dict, Samples]]) -> dict[str, list[dict]]:
    """Each policy's completions table: prompt, completion, reward r, each r_k (`reward_<k>`) where
    r sums several, and the judge's score where there is a judge."""
    tables = {}
    for name, (_, s) in evaluated.items():
        tables[name] = [
            {"prompt": p, "completion": c, "reward": r}
            | {f"reward_{key}": values[i] for key, values in s.rewards.items()}
            | ({"judge": s.judge[i]} if s.judge else {})
            for i, (p, c, r) in enumerate(zip(s.prompts, s.completions, s.reward, strict=True))
        ]
    return tables
