"""Sampling completions: y ~ π_θ(·|x) with temperature τ, top_k = 0, top_p = 1, stopping at EOS
or after L new tokens (paper Algorithm 1): no greedy decoding, no truncation of the distribution."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from warp_rlhf import cpu
from warp_rlhf.policy.rollout import Rollout, build_rollout, eos_ids


def forked_rng(device: torch.device) -> contextlib.AbstractContextManager:
    """The global RNG of the CPU (and of `device`, a GPU) saved on entry and put back on exit."""
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    return torch.random.fork_rng(devices=cuda)


@contextlib.contextmanager
def drawing_from(generator: torch.Generator) -> Iterator[None]:
    """Inside, the global RNG of the generator's device continues `generator`'s stream, for what
    takes no generator (dropout, PEFT's initialisation); after, the caller's RNG is as it was.

    A CPU or GPU generator seeded with s draws what the global RNG seeded with s draws, so this
    gives the same numbers as seeding the global RNG, without changing it for the caller.
    """
    device = generator.device
    with forked_rng(device):
        if device.type == "cuda":
            torch.cuda.set_rng_state(generator.get_state(), device)
        else:
            torch.random.set_rng_state(generator.get_state())
        yield


def sample_categorical(logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One draw per row from softmax(logits), by inverting the CDF with one uniform per row, drawn
    from `generator` (None: the global torch RNG).

    The same distribution as `torch.multinomial`, which draws an exponential for every
    vocabulary entry; this needs one cumulative sum.
    """
    cdf = torch.softmax(logits, dim=-1).cumsum(dim=-1)
    u = torch.rand(logits.shape[0], 1, device=logits.device, dtype=cdf.dtype, generator=generator) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).clamp(max=logits.shape[-1] - 1).squeeze(-1)


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts its BOS token first when it encodes with its special tokens."""
    if tokenizer.bos_token_id is None:
        return False
    ids = tokenizer("x", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == tokenizer.bos_token_id


def encode_prompts(tokenizer, prompts: list[str]):
    """Left-padded prompt ids and mask; each prompt starts with the BOS token where the tokenizer
    adds one (Llama, Gemma), as the model saw in training. Other special tokens a tokenizer may
    add around a text (an EOS after it) are not: a prompt is continued, not ended."""
    ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    if adds_bos(tokenizer):
        ids = [[tokenizer.bos_token_id, *row] for row in ids]
    return tokenizer.pad({"input_ids": ids}, padding=True, padding_side="left", return_tensors="pt")


@torch.no_grad()
def sample(
    model,
    tokenizer,
    prompts: list[str],
    *,
    temperature: float,
    max_new_tokens: int,
    generator: torch.Generator | None = None,
    with_logits: bool = False,
) -> Rollout | tuple[Rollout, torch.Tensor]:
    """Sample one completion per prompt, its randomness drawn from `generator` alone (a
    `torch.Generator` on the model's device; None: the global torch RNG), so a seeded generator
    gives the same completions whatever else the process draws.

    Prompts start with the tokenizer's BOS token where it adds one (`encode_prompts`).

    A prefill of the prompts, then a KV-cache decode loop: softmax(logits / τ) over the whole
    vocabulary, stopping when every row has emitted EOS or after L tokens. The prefill is packed
    without padding and the decode step written out where the CPU fast paths reproduce the
    model's own logits (`warp_rlhf.cpu`). With `with_logits`, also returns the logits / τ of
    every completion position, shape (B, L, V), taken from generation itself (no second forward).
    """
    device = next(model.parameters()).device
    batch = encode_prompts(tokenizer, prompts).to(device)
    prompt_ids, prompt_mask = batch["input_ids"], batch["attention_mask"]
    eos = eos_ids(tokenizer, model)
    eos_tensor = torch.tensor(eos, device=device)
    packed, lean = cpu.prefill_packs_exactly(model), cpu.decodes_exactly(model)
    finished = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    tokens, scaled_logits = [], []
    with cpu.onednn_linears(model, rows=len(prompts)) as weights:
        cache, logits = cpu.prefill(model, prompt_ids, prompt_mask, packed=packed)
        step = cpu.decoder(model, weights, cache, prompt_mask, max_new_tokens, lean=lean)
        del cache  # the decoder holds what it needs
        for index in range(max_new_tokens):
            scaled = logits.float() / temperature
            token = torch.where(finished, eos_tensor[0], sample_categorical(scaled, generator))
            tokens.append(token)
            if with_logits:
                scaled_logits.append(scaled)
            finished |= torch.isin(token, eos_tensor)
            if finished.all() or index == max_new_tokens - 1:
                break
            logits = step(token)
    result = build_rollout(prompt_ids, prompt_mask, torch.stack(tokens, dim=1), eos)
    return (result, torch.stack(scaled_logits, dim=1)) if with_logits else result
