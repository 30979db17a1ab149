"""Once-per-model checks that a fast path gives the model's own numbers.

A fast path is taken only for a model whose probe passed: a two-row, left-padded batch runs
through the fast path and through the model's own forward, and every pair of logits must agree
up to rounding. Each verdict is logged once at debug level (`warp_rlhf.cpu` logger), so a fast
path that silently falls back can be seen with `logging.getLogger("warp_rlhf").setLevel("DEBUG")`.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

import torch

logger = logging.getLogger("warp_rlhf.cpu")


class Batch(Protocol):
    """What the fast paths read of a batch of prompts and completions (`warp_rlhf.policy.Rollout`
    is one): left-padded prompts of `prompt_length` tokens, then the completions."""

    input_ids: torch.Tensor  # (B, P + L)
    attention_mask: torch.Tensor  # (B, P + L)
    completion_mask: torch.Tensor  # (B, L)
    prompt_length: int  # P

    @property
    def completion_ids(self) -> torch.Tensor: ...


@dataclass(frozen=True)
class Probe:
    """Two rows of 4 prompt tokens (the first with one left pad) and 3 completion tokens, no EOS."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    completion_mask: torch.Tensor
    prompt_length: int = 4

    @property
    def completion_ids(self) -> torch.Tensor:
        return self.input_ids[:, self.prompt_length :]

    @classmethod
    def for_model(cls, model) -> Probe:
        device = next(model.parameters()).device
        vocab = model.get_output_embeddings().weight.shape[0]
        ids = torch.arange(3, 3 + 14, device=device).remainder(vocab).view(2, 7)
        prompt_mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]], device=device)
        completion_mask = torch.ones_like(ids[:, 4:])
        return cls(ids, torch.cat([prompt_mask, completion_mask], dim=1), completion_mask)


_VERDICTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def verdict(model, what: str, pairs: Callable[[Probe], Iterable[tuple[torch.Tensor, torch.Tensor]]]) -> bool:
    """`pairs(probe)` → (expected, got) logits on a `Probe`, all close: checked once per model
    and `what`, and False where the probe fails. The check runs every module in eval mode (a
    dropout on while training draws neither masks nor random numbers for it)."""
    verdicts = _VERDICTS.setdefault(model, {})
    if what not in verdicts:
        probe = Probe.for_model(model)
        device = probe.input_ids.device
        training = [module for module in model.modules() if module.training]
        try:
            for module in training:
                module.eval()
            with torch.no_grad(), torch.autocast(device.type, enabled=False):
                verdicts[what] = all(_close(expected, got) for expected, got in pairs(probe))
        except (RuntimeError, ValueError, TypeError, IndexError, AttributeError):
            verdicts[what] = False
        finally:
            for module in training:
                module.train()
        taken = "taken" if verdicts[what] else "not exact for this model: falling back"
        logger.debug("fast path '%s' for %s: %s", what, type(model).__name__, taken)
    return verdicts[what]


def _close(expected: torch.Tensor, got: torch.Tensor) -> bool:
    """Equal up to rounding: 1e-4 of the logits' scale in fp32, 2e-2 in half precision."""
    tolerance = 1e-4 if expected.dtype == torch.float32 else 2e-2
    expected, got = expected.float(), got.float()
    scale = expected.abs().max().clamp(min=1.0)
    return got.shape == expected.shape and bool((got - expected).abs().max() <= tolerance * scale)
