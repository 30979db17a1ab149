"""Token log-probabilities of sampled completions, and the sequence log-probability ℓ.

ℓ = Σ_t log π_θ(y_t | x, y_<t) counts the completion's tokens up to and including the first
EOS; prompt and padding are excluded. π is the *sampling* distribution softmax(logits / τ), so ℓ
is the log-probability of what was actually sampled.
"""

from __future__ import annotations

import torch

from warp_rlhf import cpu
from warp_rlhf.policy.rollout import Rollout


def padded_logits(model, rollout: Rollout) -> torch.Tensor:
    """The model's own forward over the padded rollout, its output layer at completion positions."""
    start, width = rollout.prompt_length - 1, rollout.completion_mask.shape[1]
    return model(
        input_ids=rollout.input_ids,
        attention_mask=rollout.attention_mask,
        position_ids=cpu.position_ids(rollout.attention_mask),
        logits_to_keep=torch.arange(start, start + width, device=rollout.input_ids.device),
        use_cache=False,
    ).logits


def training_forward(model):
    """The forward that gives this model's own logits (B, L, V): padding-free where that is exact
    for the model (`cpu.packs_exactly`), else `padded_logits`."""
    return cpu.packed_logits if cpu.packs_exactly(model, padded_logits) else padded_logits


def token_logits(model, rollout: Rollout, temperature: float) -> torch.Tensor:
    """Logits / τ predicting each completion token, shape (B, L, V).

    τ divides in place without a gradient; with one, out of place: the logits are a view of the
    output layer's product, and dividing a view in place makes autograd copy the whole (B, L, V)
    gradient in the backward pass, at the step's memory peak.
    """
    forward = training_forward(model)
    with cpu.onednn_linears(model):
        logits = forward(model, rollout).float()
    if temperature == 1.0:
        return logits
    return logits / temperature if torch.is_grad_enabled() else logits.div_(temperature)


def completion_logprobs(
    model, rollout: Rollout, temperature: float, *, with_entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log π(y_t | x, y_<t) of each completion token under softmax(logits / τ), shape (B, L), and
    with `with_entropy` the entropy H_t of that distribution (nats, no gradient), shape (B, L).

    Where the model's logits are its output layer's product and nothing more, the output layer
    and the log-softmax run as one function (`cpu.fuses_head`); elsewhere from `token_logits`.
    The same numbers either way.
    """
    forward = training_forward(model)
    if cpu.fuses_head(model, forward):
        return cpu.head_completion_logprobs(model, forward, rollout, temperature, with_entropy)
    logits = token_logits(model, rollout, temperature)
    entropy = cpu.entropy(logits, cpu.logsumexp(logits.detach())) if with_entropy else None
    return cpu.token_logprobs(logits, rollout.completion_ids), entropy


def sequence_logprobs(logits: torch.Tensor, rollout: Rollout) -> torch.Tensor:
    """ℓ_b = Σ_t log softmax(logits)[y_b,t] = Σ_t (z_y − logsumexp z) over the completion mask, shape (B,)."""
    return (cpu.token_logprobs(logits, rollout.completion_ids) * rollout.completion_mask).sum(-1)
