"""Gradient checkpointing of the training forward: each decoder layer keeps only its input for the
backward pass and runs its forward again there, trading about one more forward for the layers'
saved activations (TRL's `gradient_checkpointing`).

transformers checkpoints a model's layers only in training mode, while the policy trains in eval
mode (no dropout). `checkpointed(model)` wraps the layers itself, with torch's non-reentrant
checkpoint, and the recomputation runs exactly the forwards of the first pass: the fast paths
replace some modules' forwards inside contexts of their own (`warp_rlhf.cpu`: oneDNN linears,
`lean_backward`), and the backward pass may run after such a context has closed. Each layer's
forward records which of its modules had a forward of their own and puts them back for its
recomputation, so the recomputed activations, and hence the gradients, are bitwise those of the
first pass. The RNG state (LoRA's dropout) is restored for the recomputation as well.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
from torch.utils.checkpoint import checkpoint

LISTS = ("layers", ".h")
"""How models without transformers' checkpointing layers name their list of blocks."""
Forwards = dict[torch.nn.Module, object | None]
"""Each module of a layer and the forward of its own it had (None: its class's)."""


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's transformer blocks: the modules transformers checkpoints
    (`GradientCheckpointingLayer`), or else the members of its first `layers` / `h` list."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if layers:
        return layers
    lists = (m for name, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and name.endswith(LISTS))
    return list(next(lists, []))


def own_forwards(layer: torch.nn.Module) -> Forwards:
    """The forwards that `layer`'s modules run now, where they are not their class's."""
    return {module: vars(module).get("forward") for module in layer.modules() if module is not layer}


@contextlib.contextmanager
def running(forwards: Forwards) -> Iterator[None]:
    """Inside, each module runs the forward it had when `forwards` was taken; after, as before."""
    now = {module: vars(module).get("forward") for module in forwards}
    _set(forwards)
    try:
        yield
    finally:
        _set(now)


def _set(forwards: Forwards) -> None:
    for module, forward in forwards.items():
        if forward is None:
            vars(module).pop("forward", None)
        else:
            module.forward = forward


def _checkpointed_forward(layer: torch.nn.Module):
    """`layer`'s forward, checkpointed where a gradient is recorded."""
    own = functools.partial(type(layer).forward, layer)

    def forward(*args, **kwargs):
        if not torch.is_grad_enabled():
            return own(*args, **kwargs)
        forwards = own_forwards(layer)
        return checkpoint(
            functools.partial(own, **kwargs),
            *args,
            use_reentrant=False,
            context_fn=lambda: (contextlib.nullcontext(), running(forwards)),
        )

    return forward


@contextlib.contextmanager
def checkpointed(model: torch.nn.Module, enabled: bool = True) -> Iterator[None]:
    """Inside (when `enabled`), every decoder layer of `model` that runs with a gradient keeps only
    its inputs, and recomputes its activations in the backward pass. The same gradients, bitwise."""
    layers = decoder_layers(model) if enabled else []
    for layer in layers:
        layer.forward = _checkpointed_forward(layer)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward
