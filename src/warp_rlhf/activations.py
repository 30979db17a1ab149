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
- a tied input embedding's gradient as sparse rows (the batch's tokens), which autograd adds to
  the output layer's dense gradient, instead of a second dense (V, d) tensor.

`lean_backward(model)` applies the last two around a training forward.
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
    at 568 tokens, 200 of 728 MB of saved activations. An input embedding tied to the output
    layer returns sparse gradient rows, which autograd adds to the output layer's dense gradient
    (the parameter's gradient stays dense). Other modules are left as they are.
    """
    mlps = [m for m in model.modules() if _is_gated_mlp(m)]
    for mlp in mlps:

        def forward(x: torch.Tensor, mlp=mlp) -> torch.Tensor:
            gate, up, down = mlp.gate_proj(x), mlp.up_proj(x), mlp.down_proj
            return _GatedProjection.apply(gate, up, down.weight, down.bias, mlp.act_fn)

        mlp.forward = forward
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = isinstance(embedding, torch.nn.Embedding) and head is not None and embedding.weight is head.weight
    was_sparse = embedding.sparse if tied else False
    if tied:
        embedding.sparse = True
    try:
        yield
    finally:
        for mlp in mlps:
            del mlp.forward
        if tied:
            embedding.sparse = was_sparse
