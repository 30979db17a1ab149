"""Sampling completions and their sequence log-probabilities.

y ~ π_θ(·|x) with temperature τ, top_k = 0, top_p = 1, stopping at EOS or L new tokens.
Prompts are left-padded so every completion starts at the same column. The sequence
log-probability ℓ = Σ_t log π_θ(y_t | x, y_<t) counts the completion's tokens up to and
including the first EOS; prompt and padding are excluded. π is the *sampling* distribution
softmax(logits / τ), so ℓ is the log-probability of what was actually sampled.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from warp_rlhf import activations, decoding, packing
from warp_rlhf.activations import head_logprobs, token_logprobs
from warp_rlhf.gemm import onednn_linears, runs_on_onednn
from warp_rlhf.packing import position_ids


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


def sample_categorical(logits: torch.Tensor) -> torch.Tensor:
    """One draw per row from softmax(logits), by inverting the CDF with one uniform per row.

    The same distribution as `torch.multinomial`, which on CPU spends ~17 ms per call drawing an
    exponential for every vocabulary entry; this needs one cumulative sum.
    """
    cdf = torch.softmax(logits, dim=-1).cumsum(dim=-1)
    u = torch.rand(logits.shape[0], 1, device=logits.device, dtype=cdf.dtype) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).clamp(max=logits.shape[-1] - 1).squeeze(-1)


@torch.no_grad()
def sample(model, tokenizer, prompts: list[str], *, temperature: float, max_new_tokens: int, with_logits: bool = False):
    """Sample one completion per prompt (uses the global torch RNG: seed it first).

    A prefill of the prompts (packed without padding where `packing.prefill_packs_exactly`), then a
    KV-cache decode loop (`decoding.LlamaDecoder` where `decoding.decodes_exactly`, else the model's
    own forward), both on oneDNN weights packed for B rows on CPU: softmax(logits / τ) over the
    whole vocabulary (top_k = 0, top_p = 1), stopping when every row has emitted EOS or after L tokens. With
    `with_logits`, also returns the logits / τ of every completion position, shape (B, L, V),
    taken from generation itself (no second forward pass).
    """
    device = next(model.parameters()).device
    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    prompt_ids, prompt_mask = batch["input_ids"], batch["attention_mask"]
    eos = eos_ids(tokenizer, model)
    eos_tensor = torch.tensor(eos, device=device)
    packed, lean = packing.prefill_packs_exactly(model), decoding.decodes_exactly(model)
    finished = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    tokens, scaled_logits = [], []
    with onednn_linears(model, rows=len(prompts)) as weights:
        cache, logits = packing.prefill(model, prompt_ids, prompt_mask, packed=packed)
        step = decoding.decoder(model, weights, cache, prompt_mask, max_new_tokens, lean=lean)
        del cache  # the decoder holds what it needs
        for index in range(max_new_tokens):
            scaled = logits.float() / temperature
            token = torch.where(finished, eos_tensor[0], sample_categorical(scaled))
            tokens.append(token)
            if with_logits:
                scaled_logits.append(scaled)
            finished |= torch.isin(token, eos_tensor)
            if finished.all() or index == max_new_tokens - 1:
                break
            logits = step(token)
    result = build_rollout(prompt_ids, prompt_mask, torch.stack(tokens, dim=1), eos)
    return (result, torch.stack(scaled_logits, dim=1)) if with_logits else result


def token_logits(model, rollout: Rollout, temperature: float) -> torch.Tensor:
    """Logits / τ predicting each completion token, shape (B, L, V).

    The forward is padding-free (`packing`) wherever that gives the model's own logits, and the
    output layer runs on the L completion positions only, so there is no full-vocabulary tensor
    from slicing in the backward. τ divides in place without a gradient; with one, out of place:
    the logits are a view of the output layer's product, and dividing a view in place makes
    autograd copy the whole (B, L, V) gradient in the backward pass, at the step's memory peak
    (−150 MB of peak RSS out of place; nothing saves the undivided logits, so they are freed at
    once). On CPU the linears multiply with oneDNN (`gemm.onednn_linears`), with or without a
    gradient.
    """
    forward = _forward(model)
    with onednn_linears(model):
        logits = forward(model, rollout).float()
    if temperature == 1.0:
        return logits
    return logits / temperature if torch.is_grad_enabled() else logits.div_(temperature)


def completion_logprobs(
    model, rollout: Rollout, temperature: float, *, with_entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log π(y_t | x, y_<t) of each completion token under softmax(logits / τ), shape (B, L), and
    with `with_entropy` the entropy H_t of that distribution (nats, no gradient), shape (B, L).

    Where the model's logits are its output layer's product and nothing more (checked once per
    model, `fuses_head`) and that layer is CPU fp32 without a bias, the output layer and the
    log-softmax run as one function (`activations.head_logprobs`), whose backward makes no
    (B·L, V) tensor; elsewhere from `token_logits`. The same numbers either way.
    """
    ids, forward = rollout.completion_ids, _forward(model)
    if fuses_head(model, forward):
        with onednn_linears(model):
            hidden = head_inputs(model, forward, rollout)
        weight = model.get_output_embeddings().weight
        logprobs, entropy = head_logprobs(hidden, weight, ids.flatten(), temperature, with_entropy)
        return logprobs.view_as(ids), entropy.view_as(ids) if with_entropy else None
    logits = token_logits(model, rollout, temperature)
    entropy = activations.entropy(logits, activations.logsumexp(logits.detach())) if with_entropy else None
    return token_logprobs(logits, ids), entropy


def _forward(model):
    """The training forward that gives this model's own logits: packed where it can be."""
    return packing.packed_logits if packing.packs_exactly(model, padded_logits) else padded_logits


def head_inputs(model, forward, rollout: Rollout) -> torch.Tensor:
    """The output layer's input at the B · L completion positions, (B · L, d): `forward` with the
    output layer skipped (it returns one zero per position, which the caller ignores)."""
    head, captured = model.get_output_embeddings(), []
    previous = vars(head).get("forward")  # an enclosing `onednn_linears`' forward, if any

    def skipped(x: torch.Tensor) -> torch.Tensor:
        captured.append(x)
        return x.new_zeros(*x.shape[:-1], 1)

    head.forward = skipped
    try:
        forward(model, rollout)
    finally:
        if previous is None:
            del head.forward
        else:
            head.forward = previous
    (hidden,) = captured
    return hidden.reshape(-1, hidden.shape[-1])


def fuses_head(model, forward) -> bool:
    """Whether `completion_logprobs` may take the logits as h Wᵀ from `head_inputs`: an output
    layer that is a CPU fp32 `nn.Linear` without a bias, and logits that the model returns as that
    layer gave them (no soft-capping or scaling after it; checked once per model)."""
    head = model.get_output_embeddings()
    if not (isinstance(head, torch.nn.Linear) and head.bias is None and runs_on_onednn(head.weight)):
        return False

    def pairs(probe: Rollout):
        logits = forward(model, probe)
        return [(logits, (head_inputs(model, forward, probe) @ head.weight.T).view_as(logits))]

    return packing.verdict(model, "head", pairs)


def padded_logits(model, rollout: Rollout) -> torch.Tensor:
    """The model's own forward over the padded rollout, its output layer at completion positions."""
    start, width = rollout.prompt_length - 1, rollout.completion_mask.shape[1]
    return model(
        input_ids=rollout.input_ids,
        attention_mask=rollout.attention_mask,
        position_ids=position_ids(rollout.attention_mask),
        logits_to_keep=torch.arange(start, start + width, device=rollout.input_ids.device),
        use_cache=False,
    ).logits


def sequence_logprobs(logits: torch.Tensor, rollout: Rollout) -> torch.Tensor:
    """ℓ_b = Σ_t log softmax(logits)[y_b,t] = Σ_t (z_y − logsumexp z) over the completion mask, shape (B,)."""
    return (token_logprobs(logits, rollout.completion_ids) * rollout.completion_mask).sum(-1)


def mean_entropy(entropy: torch.Tensor, rollout: Rollout) -> float:
    """The mean of per-token entropies (B, L) over the completion mask."""
    mask = rollout.completion_mask
    return ((entropy * mask).sum() / mask.sum().clamp(min=1)).item()


def decode(tokenizer, rollout: Rollout) -> list[str]:
    """The completions as text (special tokens and padding dropped)."""
    ids = rollout.completion_ids * rollout.completion_mask
    return [
        tokenizer.decode(row[mask.bool()], skip_special_tokens=True)
        for row, mask in zip(ids, rollout.completion_mask, strict=True)
    ]
