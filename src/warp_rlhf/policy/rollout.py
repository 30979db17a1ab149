"""The rollout batch: prompts and sampled completions as token ids, and their masks.

Prompts are left-padded so every completion starts at the same column P. A completion counts
its tokens up to and including the first EOS; what follows is padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Rollout:
    """A batch of prompts with sampled completions, as token ids."""

    input_ids: torch.Tensor  # (B, P + L): left-padded prompt, then completion
    attention_mask: torch.Tensor  # (B, P + L): 0 on padding (left of the prompt, after EOS)
    completion_mask: torch.Tensor  # (B, L): 1 on completion tokens up to and including EOS
    prompt_length: int  # P, the padded prompt width

    @property
    def completion_ids(self) -> torch.Tensor:
        return self.input_ids[:, self.prompt_length :]

    @property
    def completion_lengths(self) -> torch.Tensor:
        return self.completion_mask.sum(-1)

    def rows(self, start: int, stop: int) -> Rollout:
        """The micro-batch of rows start..stop-1."""
        return Rollout(
            self.input_ids[start:stop],
            self.attention_mask[start:stop],
            self.completion_mask[start:stop],
            self.prompt_length,
        )


def eos_ids(tokenizer, model) -> list[int]:
    """Every token id that ends a completion (the tokenizer's EOS and the model's)."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    return sorted(i for i in ids if i is not None)


def completion_mask(completion_ids: torch.Tensor, eos: list[int]) -> torch.Tensor:
    """1 up to and including the first EOS of each row, 0 after it."""
    is_eos = torch.isin(completion_ids, torch.tensor(eos, device=completion_ids.device))
    ended_before = (torch.cumsum(is_eos.long(), dim=-1) - is_eos.long()) > 0
    return (~ended_before).long()


def build_rollout(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, completion_ids: torch.Tensor, eos: list[int]):
    """Assemble a Rollout from left-padded prompts and raw generated tokens."""
    mask = completion_mask(completion_ids, eos)
    return Rollout(
        input_ids=torch.cat([prompt_ids, completion_ids], dim=1),
        attention_mask=torch.cat([prompt_mask, mask], dim=1),
        completion_mask=mask,
        prompt_length=prompt_ids.shape[1],
    )


def decode(tokenizer, rollout: Rollout) -> list[str]:
    """The completions as text (special tokens and padding dropped)."""
    ids = rollout.completion_ids * rollout.completion_mask
    return [
        tokenizer.decode(row[mask.bool()], skip_special_tokens=True)
        for row, mask in zip(ids, rollout.completion_mask, strict=True)
    ]


def token_ids(rollout: Rollout) -> list[list[int]]:
    """Each completion's token ids, up to and including its EOS (TRL's `completion_ids`)."""
    return [
        row[mask.bool()].tolist() for row, mask in zip(rollout.completion_ids, rollout.completion_mask, strict=True)
    ]


def mean_entropy(entropy: torch.Tensor, rollout: Rollout) -> float:
    """The mean of per-token entropies (B, L) over the completion mask."""
    mask = rollout.completion_mask
    return ((entropy * mask).sum() / mask.sum().clamp(min=1)).item()
