"""Padding-free forwards: sequences packed end to end into a few rows.

A rollout is left-padded to its longest prompt and right-padded after EOS, so part of its
positions are padding. Packed, each sequence
(its real prompt tokens and completion up to EOS) is a segment of a row, with position ids
restarting at 0; transformers then builds a block-diagonal causal mask from the position ids,
so a segment attends to itself only and its logits are those of the padded forward.
The prompts' prefill in generation is packed the same way (`prefill`). Rows are at most about
`PACK_WIDTH` tokens wide (a longer sequence gets a row to itself):
attention over a row is quadratic in its width, the linear layers are not.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import torch

from warp_rlhf.cpu.probes import Batch, verdict

PACK_WIDTH = 128
"""Tokens per packed row; chosen by measurement (benchmarks/NOTES.md)."""


@dataclass
class PackedRows:
    input_ids: torch.Tensor  # (R, W): segments end to end, then filler
    position_ids: torch.Tensor  # (R, W): 0, 1, … within each segment (and within the filler)
    segment: torch.Tensor  # (R, W): which sequence each position holds (filler: B + row)
    starts: torch.Tensor  # (B,): flat index into R·W of each sequence's first token


def pack_sequences(sequences: list[torch.Tensor], width: int = PACK_WIDTH) -> PackedRows:
    """Token sequences of different lengths as segments of a few rows (`_smallest_packing`)."""
    lengths = [len(tokens) for tokens in sequences]
    members, fill = _smallest_packing(lengths, width)
    rows, row_width = len(members), max(fill)
    input_ids = sequences[0].new_zeros(rows, row_width)
    positions = torch.arange(row_width).repeat(rows, 1)
    segment = torch.arange(rows).unsqueeze(1).repeat(1, row_width) + len(sequences)
    starts = torch.empty(len(sequences), dtype=torch.long)
    for row, placed in enumerate(members):
        for b, offset in placed:
            input_ids[row, offset : offset + lengths[b]] = sequences[b]
            positions[row, offset : offset + lengths[b]] = torch.arange(lengths[b])
            segment[row, offset : offset + lengths[b]] = b
            starts[b] = row * row_width + offset
        positions[row, fill[row] :] = torch.arange(row_width - fill[row])  # filler: a segment of its own
    device = input_ids.device
    return PackedRows(input_ids, positions.to(device), segment.to(device), starts.to(device))


def pack(rollout: Batch, width: int = PACK_WIDTH) -> tuple[PackedRows, torch.Tensor]:
    """Each row's real tokens (prompt without padding, completion up to EOS) as one segment, and
    the targets: flat indices (B, L) of the positions predicting each completion token.

    Completion token t of row b is predicted at the segment's offset p_b − 1 + t; positions
    after EOS (masked out of ℓ) point at the segment's last token.
    """
    prompt_mask = rollout.attention_mask[:, : rollout.prompt_length].bool()
    completion_mask = rollout.completion_mask.bool()
    prompt_lengths = prompt_mask.sum(1, keepdim=True)
    if prompt_lengths.min() == 0:
        raise ValueError("a prompt has no tokens: its first completion token has no position to be predicted from")
    sequences = [
        torch.cat([prompt[keep], completion[kept]])
        for prompt, keep, completion, kept in zip(rollout.input_ids[:, : rollout.prompt_length], prompt_mask,
                                                  rollout.completion_ids, completion_mask, strict=True)
    ]  # fmt: skip
    rows = pack_sequences(sequences, width)
    steps = torch.arange(completion_mask.shape[1], device=prompt_lengths.device)
    last = prompt_lengths + completion_mask.sum(1, keepdim=True) - 1
    targets = rows.starts.unsqueeze(1) + torch.minimum(prompt_lengths - 1 + steps, last)
    return rows, targets


def block_causal_mask(rows: PackedRows) -> torch.Tensor:
    """(R, 1, W, W) bool: a position attends to the positions of its own segment up to itself."""
    width = rows.input_ids.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=rows.segment.device).tril()
    return ((rows.segment.unsqueeze(2) == rows.segment.unsqueeze(1)) & causal).unsqueeze(1)


ROW_COUNTS_TRIED = 8
"""Row counts `_smallest_packing` compares, from the fewest up: more rows only narrow them."""


def _smallest_packing(lengths: list[int], width: int) -> tuple[list[list[tuple[int, int]]], list[int]]:
    """Segments (index, offset) per row and each row's fill, for the row count whose rows × widest
    row is smallest among `ROW_COUNTS_TRIED` counts from ⌈Σ lengths / width⌉. Each count is
    filled longest first into the emptiest row (LPT), which balances the rows to within one
    sequence; a heap keeps that O(B log R).
    """
    fewest = math.ceil(sum(lengths) / max(width, max(lengths)))
    order = sorted(range(len(lengths)), key=lambda b: -lengths[b])
    best = None
    for rows in range(fewest, min(len(lengths), fewest + ROW_COUNTS_TRIED - 1) + 1):
        members, emptiest = [[] for _ in range(rows)], [(0, row) for row in range(rows)]
        for b in order:
            filled, row = heapq.heappop(emptiest)
            members[row].append((b, filled))
            heapq.heappush(emptiest, (filled + lengths[b], row))
        fill = [0] * rows
        for filled, row in emptiest:
            fill[row] = filled
        if best is None or rows * max(fill) < len(best[1]) * max(best[1]):
            best = members, fill
    return best


def packed_logits(model, rollout: Batch) -> torch.Tensor:
    """Logits predicting each completion token, shape (B, L, V), from a packed forward.

    The body runs on the packed rows; a hook on it lays the rows end to end as one sequence,
    so the model's own head (with whatever scaling or soft-capping it applies) runs on exactly
    the B · L target positions, picked with `logits_to_keep`.
    """
    rows, targets = pack(rollout)
    output = _flat_head_forward(model, input_ids=rows.input_ids, position_ids=rows.position_ids,
                                logits_to_keep=targets.flatten(), use_cache=False)  # fmt: skip
    return output.logits.view(*targets.shape, -1)


def _flat_head_forward(model, **inputs):
    """The model's forward with its body's rows laid end to end before the head, so that
    `logits_to_keep` indexes the flattened rows."""

    def one_sequence(module, args, output):
        output.last_hidden_state = output.last_hidden_state.flatten(0, 1).unsqueeze(0)
        return output

    hook = model.base_model.register_forward_hook(one_sequence)
    try:
        return model(**inputs)
    finally:
        hook.remove()


def packs_exactly(model, padded_logits) -> bool:
    """Whether `packed_logits` gives the model's own numbers: checked once per model against
    `padded_logits(model, rollout)`.

    True for the models transformers builds masks for from position ids (Llama, Qwen, SmolLM,
    Gemma, Mistral, …); False where a model ignores packing (e.g. remote code with its own masks).
    The probe packs two short sequences into one row, so attention across them shows up as an
    O(1) change, far above rounding.
    """
    return verdict(model, "forward", lambda probe: [(padded_logits(model, probe), packed_logits(model, probe))])


def prefill_packs_exactly(model) -> bool:
    """Whether a packed `prefill` plus one decode step gives the padded ones' logits: checked once
    per model. Needs a plain KV cache (a sliding-window cache keeps the last tokens of a packed
    row, not of each prompt) and a model that takes a 4D mask as given.
    """
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    if not all(type(layer) is DynamicLayer for layer in DynamicCache(config=model.config).layers):
        return False

    def pairs(probe: Batch):
        padded, packed = (_prefill_and_step(model, probe, packed) for packed in (False, True))
        return list(zip(padded, packed, strict=True))

    return verdict(model, "prefill", pairs)


def _prefill_and_step(model, probe: Batch, packed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits after a prefill of the probe's prompts, and after one decode step from it."""
    prompt_ids, prompt_mask = probe.input_ids[:, : probe.prompt_length], probe.attention_mask[:, : probe.prompt_length]
    cache, first = prefill(model, prompt_ids, prompt_mask, packed=packed)
    mask = torch.cat([prompt_mask, torch.ones_like(prompt_mask[:, :1])], dim=1)
    step = model(input_ids=probe.completion_ids[:, :1], attention_mask=mask, cache=cache, use_cache=True,
                 position_ids=position_ids(prompt_mask)[:, -1:] + 1, logits_to_keep=1)  # fmt: skip
    return first, step.logits[:, -1]


def prefill(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, *, packed: bool):
    """The prompts' KV cache, laid out left-padded as the decode loop needs it, and the logits at
    each prompt's last token, shape (B, V).

    Packed, the prompts' real tokens run as segments of a few rows under an explicit
    block-diagonal causal mask (transformers does not detect packing when a cache is passed),
    and each row's keys and values are then gathered into the left-padded layout. Padding slots hold a copy of a
    real key and value; the attention mask keeps them out.
    """
    from transformers import DynamicCache

    if not packed:
        cache = DynamicCache(config=model.config)
        output = model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=position_ids(prompt_mask),
                       cache=cache, use_cache=True, logits_to_keep=1)  # fmt: skip
        return cache, output.logits[:, -1]
    width, keep = prompt_ids.shape[1], prompt_mask.bool()
    rows = pack_sequences([prompt[kept] for prompt, kept in zip(prompt_ids, keep, strict=True)])
    lengths = keep.sum(1, keepdim=True)
    slots = torch.arange(width, device=prompt_ids.device)
    source = rows.starts.unsqueeze(1) + (slots - (width - lengths)).clamp(min=0)  # (B, P) → packed index
    packed_cache = DynamicCache(config=model.config)
    output = _flat_head_forward(model, input_ids=rows.input_ids, position_ids=rows.position_ids,
                                attention_mask=block_causal_mask(rows), cache=packed_cache, use_cache=True,
                                logits_to_keep=source[:, -1])  # fmt: skip

    def left_padded(states: torch.Tensor) -> torch.Tensor:  # (R, h, W, d) → (B, h, P, d)
        return states.transpose(1, 2).flatten(0, 1)[source].transpose(1, 2)

    layers = [(left_padded(layer.keys), left_padded(layer.values)) for layer in packed_cache.layers]
    return DynamicCache(ddp_cache_data=layers, config=model.config), output.logits[0]


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, as `generate` uses them."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)
