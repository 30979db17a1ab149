"""What the training forward keeps for the backward pass: the same numbers, less memory.

The step's memory peak is the policy's backward pass, when saved activations are alive and
the gradients are made (benchmarks/NOTES.md). These cut it without recomputing any matrix
product:

- `token_logprobs`: log softmax(z)_y = z_y − logsumexp z over the vocabulary, whose backward
  makes one (N, V) tensor, softmax(z) scaled in place, instead of the three or four that
  autograd's gather and logsumexp make;
- a gated MLP, down(act(gate(x)) ⊙ up(x)), saves gate(x) and up(x) only;
  act(gate) and the product, half of the MLP's saved activations, are recomputed in the
  backward pass (elementwise work);
- an RMSNorm, w ⊙ x / √(mean(x²) + ε), saves x and 1/√(mean(x²) + ε) only, where autograd
  also keeps the normalised x (one (T, d) tensor per norm); its backward is one function;
- a tied input embedding's gradient as sparse rows (the batch's tokens), which autograd adds to
  the output layer's dense gradient, instead of a second dense (V, d) tensor.

`lean_backward(model)` applies the last three around a training forward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from warp_rlhf.gemm import input_gradient, product

CHUNK_BYTES = 2**22
"""logsumexp runs over pieces of the logits this large: (384, 49,152) at once took 35 ms,
in pieces of 21 rows (4 MB, which stay in cache) 16 ms."""


def logsumexp(logits: torch.Tensor) -> torch.Tensor:
    """logsumexp over the last dimension, keepdim, in cache-sized pieces of rows."""
    rows = logits.reshape(-1, logits.shape[-1])
    piece = max(1, CHUNK_BYTES // (rows.shape[-1] * rows.element_size()))
    return torch.cat([torch.logsumexp(part, dim=-1) for part in rows.split(piece)]).view(*logits.shape[:-1], 1)


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        normaliser = logsumexp(logits)
        ctx.save_for_backward(logits, normaliser, ids)
        return (logits.gather(-1, ids.unsqueeze(-1)) - normaliser).squeeze(-1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logits, normaliser, ids = ctx.saved_tensors
        # ∂(z_y − lse z)/∂z = onehot(y) − softmax(z)
        grad_logits = torch.sub(logits, normaliser).exp_().mul_(-grad.unsqueeze(-1))
        return grad_logits.scatter_add_(-1, ids.unsqueeze(-1), grad.unsqueeze(-1)), None


def token_logprobs(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[…, ids] = z_y − logsumexp z, shape of `ids`."""
    return _TokenLogprobs.apply(logits, ids)


class _GatedProjection(torch.autograd.Function):
    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, gate, up, weight, bias, activation):
        ctx.activation = activation
        ctx.save_for_backward(gate, up, weight)
        ctx.has_bias = bias is not None
        return product(activation(gate) * up, weight, bias)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_out: torch.Tensor):
        gate, up, weight = ctx.saved_tensors
        with torch.enable_grad():
            gate = gate.detach().requires_grad_()
            activated = ctx.activation(gate)
        hidden = activated.detach() * up
        grad_hidden = input_gradient(grad_out, weight)
        grad_weight = grad_out.flatten(0, -2).T @ hidden.flatten(0, -2)
        grad_bias = grad_out.flatten(0, -2).sum(0) if ctx.has_bias else None
        (grad_gate,) = torch.autograd.grad(activated, gate, grad_hidden * up)
        return grad_gate, grad_hidden.mul_(activated.detach()), grad_weight, grad_bias, None


class _RmsNorm(torch.autograd.Function):
    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x, weight, eps):
        x32 = x.float()
        scale = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, scale, weight)
        return weight * (x32 * scale).to(x.dtype)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad: torch.Tensor):
        x, scale, weight = ctx.saved_tensors
        normed = x.float() * scale  # n = x·s, s = 1/√(mean(x²) + ε)
        grad_weight = (grad * normed.to(x.dtype)).flatten(0, -2).sum(0)
        grad_normed = (grad * weight).float()
        # ∂n/∂x: s (g − n · mean(g ⊙ n)), the mean over the hidden dimension
        grad_x = grad_normed.sub_(normed * (grad_normed * normed).mean(-1, keepdim=True)).mul_(scale)
        return grad_x.to(x.dtype), grad_weight.to(weight.dtype), None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """w ⊙ x / √(mean(x²) + ε) in fp32, as Llama's RMSNorm, saving x and 1/√(mean(x²) + ε) for the backward."""
    return _RmsNorm.apply(x, weight, eps)


_RMS_NORM_CLASSES: dict[type, bool] = {}


def _is_rms_norm(module: torch.nn.Module) -> bool:
    """A module whose output is `rms_norm(x, module.weight, module.variance_epsilon)`, bit for bit.

    Checked once per class on a random input, so a norm with other arithmetic (Gemma's (1 + w))
    keeps its own forward.
    """
    weight, eps = getattr(module, "weight", None), getattr(module, "variance_epsilon", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1 or not isinstance(eps, float):
        return False
    kind = type(module)
    if kind not in _RMS_NORM_CLASSES:
        with torch.no_grad():
            x = torch.randn(3, weight.numel(), device=weight.device, dtype=weight.dtype)
            _RMS_NORM_CLASSES[kind] = torch.equal(module(x), rms_norm(x, weight, eps))
    return _RMS_NORM_CLASSES[kind]


def _is_gated_mlp(module: torch.nn.Module) -> bool:
    parts = ("gate_proj", "up_proj", "down_proj")
    return all(isinstance(getattr(module, p, None), torch.nn.Linear) for p in parts) and callable(
        getattr(module, "act_fn", None)
    )


@contextlib.contextmanager
def lean_backward(model: torch.nn.Module) -> Iterator[None]:
    """Inside, a training forward keeps less for its backward pass; outputs and gradients are unchanged.

    Every gated MLP (Llama, Mistral, Qwen, Gemma, SmolLM: `gate_proj`, `up_proj`, `down_proj`,
    `act_fn`) saves gate(x) and up(x) instead of also act(gate(x)) and their product: on SmolLM2
    at 568 tokens, 200 of 728 MB of saved activations. Every RMSNorm whose arithmetic is
    Llama's saves x and its scale, not the normalised x. An input embedding tied to the output
    layer returns sparse gradient rows, which autograd adds to the output layer's dense gradient
    (the parameter's gradient stays dense). Other modules are left as they are.
    """
    mlps = [m for m in model.modules() if _is_gated_mlp(m)]
    for mlp in mlps:

        def forward(x: torch.Tensor, mlp=mlp) -> torch.Tensor:
            gate, up, down = mlp.gate_proj(x), mlp.up_proj(x), mlp.down_proj
            return _GatedProjection.apply(gate, up, down.weight, down.bias, mlp.act_fn)

        mlp.forward = forward
    norms = [m for m in model.modules() if _is_rms_norm(m)]
    for norm in norms:
        norm.forward = lambda x, norm=norm: rms_norm(x, norm.weight, norm.variance_epsilon)
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = isinstance(embedding, torch.nn.Embedding) and head is not None and embedding.weight is head.weight
    was_sparse = embedding.sparse if tied else False
    if tied:
        embedding.sparse = True
    try:
        yield
    finally:
        for module in mlps + norms:
            del module.forward
        if tied:
            embedding.sparse = was_sparse
