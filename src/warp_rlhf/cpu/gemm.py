"""Linear layers on CPU: oneDNN's fp32 GEMM instead of the default (MKL) one.

oneDNN is faster than MKL at the shapes of a training step on the CPUs measured, and at the few
rows of a decode step MKL re-packs every weight on every call (benchmarks/NOTES.md has the
figures). `onednn_linears(model)` swaps every `nn.Linear` of a CPU fp32
model onto oneDNN for the forwards run inside it:

- without a gradient (the anchor's forward, the decode): y = x Wᵀ + b by oneDNN; with `rows`,
  each weight is first packed once for products of about that many rows (the decode);
- with a gradient (the policy's training forward): the same product, through `OneDnnLinear`,
  whose backward gives ∂x = ∂y W by oneDNN and ∂W = ∂yᵀ x by MKL (oneDNN's is no faster there).

Anywhere else (GPU, half precision, CPU autocast, a torch without oneDNN) every function here is
the plain one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F

_ONEDNN = (
    torch.backends.mkldnn.is_available()
    and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    and hasattr(torch.ops.mkldnn, "_linear_pointwise")
)


def runs_on_onednn(*tensors: torch.Tensor) -> bool:
    """Whether these tensors are CPU fp32, oneDNN is there, and no CPU autocast (`precision: bf16`)
    would have the product in another precision."""
    cpu_fp32 = all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
    return _ONEDNN and cpu_fp32 and not torch.is_autocast_enabled("cpu")


def product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x Wᵀ + b, without recording a gradient."""
    if runs_on_onednn(x, weight):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


def input_gradient(grad_output: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """∂L/∂x = ∂L/∂y W for y = x Wᵀ + b."""
    if runs_on_onednn(grad_output, weight):
        return torch.ops.mkldnn._linear_pointwise(grad_output, weight.t(), None, "none", [], "")
    return grad_output @ weight.to(grad_output.dtype)


class OneDnnLinear(torch.autograd.Function):
    """y = x Wᵀ + b for 2-D x, with `product` forward and `input_gradient` backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return product(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_x = input_gradient(grad_output, weight) if ctx.needs_input_grad[0] else None
        grad_weight = grad_output.T @ x if ctx.needs_input_grad[1] else None
        grad_bias = grad_output.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_weight, grad_bias


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear with oneDNN products on CPU fp32, gradients included (`OneDnnLinear`)."""
    if not runs_on_onednn(x, weight):
        return F.linear(x, weight, bias)
    # The function sees 2-D tensors, so its output is not a view made inside a custom function,
    # which autograd would forbid a model to modify in place.
    return OneDnnLinear.apply(x.flatten(0, -2), weight, bias).unflatten(0, x.shape[:-1])


@contextlib.contextmanager
def onednn_linears(model: torch.nn.Module, rows: int | None = None) -> Iterator[dict[torch.nn.Module, torch.Tensor]]:
    """Inside, every `nn.Linear` of a CPU fp32 model multiplies with oneDNN; yields each linear
    layer's weight as oneDNN takes it (packed with `rows`), empty where oneDNN is not used.

    With `rows`, each weight is packed once on entry for products of about that many rows: a
    decode step at batch B is a skinny product (B rows) with every weight matrix, and packing once
    per generation saves re-packing it at every token. The packed copies serve no-grad calls only
    and are freed on exit. Without `rows`, oneDNN takes the modules' own weights: for forwards
    whose weights are read once, packing would cost more than it buys. Where a gradient is
    recorded, `linear` runs. Contexts nest: each gives back the forwards it found.
    """
    weight = next(model.parameters(), None)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    if weight is None or not runs_on_onednn(weight):
        linears = []
    weights, previous = {}, {module: vars(module).get("forward") for module in linears}
    for module in linears:
        weight = module.weight.detach()
        weights[module] = weight = torch.ops.mkldnn._reorder_linear_weight(weight, rows) if rows else weight

        def forward(x: torch.Tensor, module=module, weight=weight) -> torch.Tensor:
            if torch.is_grad_enabled() and (x.requires_grad or module.weight.requires_grad):
                return linear(x, module.weight, module.bias)
            return torch.ops.mkldnn._linear_pointwise(x, weight, module.bias, "none", [], "")

        module.forward = forward
    try:
        yield weights
    finally:
        for module in linears:  # as it was: the class's forward, or an enclosing context's
            if previous[module] is None:
                del module.forward
            else:
                module.forward = previous[module]
