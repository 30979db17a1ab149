"""Padding-free training forward: a rollout's sequences packed end to end into a few rows.

A rollout is left-padded to its longest prompt and right-padded after EOS; with prompts of
4–16 tokens and 24 new tokens about 15% of its positions are padding. Packed, each sequence
(its real prompt tokens and completion up to EOS) is a segment of a row, with position ids
restarting at 0; transformers then builds a block-diagonal causal mask from the position ids,
so a segment attends to itself only and its logits are those of the padded forward.
Rows are at most about `PACK_WIDTH` tokens wide (a longer sequence gets a row to itself):
attention over a row is quadratic in its width, the linear layers are not.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from warp_rlhf.rollout import Rollout

PACK_WIDTH = 128
"""Tokens per packed row; chosen by measurement (benchmarks/NOTES.md)."""


@dataclass
class PackedRows:
    input_ids: torch.Tensor  # (R, W): segments end to end, then filler
    position_ids: torch.Tensor  # (R, W): 0, 1, … within each segment (and within the filler)
    targets: torch.Tensor  # (B, L): flat index into R·W of the position predicting completion token t


def pack(rollout: Rollout, width: int = PACK_WIDTH) -> PackedRows:
    """Pack every row's real tokens into rows, each sequence one segment of a row.

    Completion position t of row b is predicted at its segment's offset p_b − 1 + t; positions
    after EOS (masked out of ℓ) point at the segment's last token.
    """
    prompt_mask = rollout.attention_mask[:, : rollout.prompt_length].bool()
    completion_mask = rollout.completion_mask.bool()
    prompt_lengths, completion_lengths = prompt_mask.sum(1).tolist(), completion_mask.sum(1).tolist()
    if min(prompt_lengths) == 0:
        raise ValueError("a prompt has no tokens: its first completion token has no position to be predicted from")
    lengths = [p + n for p, n in zip(prompt_lengths, completion_lengths, strict=True)]
    members, fill = _smallest_packing(lengths, width)
    rows, row_width = len(members), max(fill)
    input_ids = rollout.input_ids.new_zeros(rows, row_width)
    position_ids = torch.arange(row_width).repeat(rows, 1)
    targets = torch.empty_like(rollout.completion_mask, device="cpu")
    steps = torch.arange(targets.shape[1])
    for row, segments in enumerate(members):
        for b, offset in segments:
            tokens = torch.cat([rollout.input_ids[b, : rollout.prompt_length][prompt_mask[b]],
                                rollout.completion_ids[b][completion_mask[b]]])  # fmt: skip
            input_ids[row, offset : offset + lengths[b]] = tokens
            position_ids[row, offset : offset + lengths[b]] = torch.arange(lengths[b])
            last = offset + lengths[b] - 1
            targets[b] = row * row_width + (offset + prompt_lengths[b] - 1 + steps).clamp(max=last)
        position_ids[row, fill[row] :] = torch.arange(row_width - fill[row])  # filler: its own segment
    device = rollout.input_ids.device
    return PackedRows(input_ids, position_ids.to(device), targets.to(device))


def _smallest_packing(lengths: list[int], width: int) -> tuple[list[list[tuple[int, int]]], list[int]]:
    """Segments (index, offset) per row and each row's fill, for the row count whose rows × widest
    row is smallest, from ⌈Σ lengths / width⌉ rows up to one per sequence. Each count is filled
    longest first into the emptiest row (LPT), which balances the rows to within one sequence.
    """
    fewest = math.ceil(sum(lengths) / max(width, max(lengths)))
    best = None
    for rows in range(fewest, len(lengths) + 1):
        fill, members = [0] * rows, [[] for _ in range(rows)]
        for b in sorted(range(len(lengths)), key=lambda b: -lengths[b]):
            row = min(range(rows), key=fill.__getitem__)
            members[row].append((b, fill[row]))
            fill[row] += lengths[b]
        if best is None or rows * max(fill) < len(best[1]) * max(best[1]):
            best = members, fill
    return best


def packed_logits(model, rollout: Rollout) -> torch.Tensor:
    """Logits predicting each completion token, shape (B, L, V), from a packed forward.

    The body runs on the packed rows; a hook on it lays the rows end to end as one sequence,
    so the model's own head (with whatever scaling or soft-capping it applies) runs on exactly
    the B · L target positions, picked with `logits_to_keep`.
    """
    rows = pack(rollout)

    def one_sequence(module, inputs, output):
        output.last_hidden_state = output.last_hidden_state.flatten(0, 1).unsqueeze(0)
        return output

    hook = model.base_model.register_forward_hook(one_sequence)
    try:
        output = model(
            input_ids=rows.input_ids,
            position_ids=rows.position_ids,
            logits_to_keep=rows.targets.flatten(),
            use_cache=False,
        )
    finally:
        hook.remove()
    return output.logits.view(*rows.targets.shape, -1)


_PACKS_EXACTLY: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def packs_exactly(model, padded_logits) -> bool:
    """Whether `packed_logits` equals the model's own padded forward, checked once per model.

    True for the models transformers builds masks for from position ids (Llama, Qwen, SmolLM,
    Gemma, …); False where a model ignores packing, e.g. remote code with its own masks.
    `padded_logits(model, rollout)` is the reference. The probe packs two short sequences into
    one row, so attention across them shows up as an O(1) change, far above rounding.
    """
    if model not in _PACKS_EXACTLY:
        from warp_rlhf.rollout import build_rollout

        device = next(model.parameters()).device
        vocab = model.get_output_embeddings().weight.shape[0]
        ids = torch.arange(3, 3 + 14, device=device).remainder(vocab).view(2, 7)
        prompt_mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]], device=device)
        probe = build_rollout(ids[:, :4], prompt_mask, ids[:, 4:], eos=[-1])  # two rows, no EOS
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            expected, got = padded_logits(model, probe).float(), packed_logits(model, probe).float()
        scale = expected.abs().max().clamp(min=1.0)
        _PACKS_EXACTLY[model] = bool(got.shape == expected.shape and (got - expected).abs().max() <= 1e-2 * scale)
    return _PACKS_EXACTLY[model]
