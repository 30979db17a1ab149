"""What the training forward keeps for the backward pass: the same numbers, less memory.

The step's memory peak is the policy's backward pass, when saved activations are alive and
the gradients are made (benchmarks/NOTES.md). These cut it without recomputing any matrix
product:

- `token_logprobs`: log softmax(z)_y = z_y − logsumexp z over the vocabulary, whose backward
  makes one (N, V) tensor, softmax(z) scaled in place, instead of the three or four that
  autograd's gather and logsumexp make (`head.head_logprobs` makes none);
- a gated MLP, down(act(gate(x)) ⊙ up(x)), saves gate(x) and up(x) only;
  act(gate) and the product, half of the MLP's saved activations, are recomputed in the
  backward pass (elementwise work);
- an RMSNorm, w ⊙ x / √(mean(x²) + ε), saves x and 1/√(mean(x²) + ε) only, where autograd
  also keeps the normalised x (one (T, d) tensor per norm); its backward is one function;
- a tied input embedding's gradient as rows (the batch's tokens), added in place into the output
  layer's dense gradient once that is accumulated, instead of a second dense (V, d) tensor or
  autograd's out-of-place sum of a sparse one with the dense one (a fresh (V, d) copy per step).

`lean_backward(model)` applies the last three around a training forward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from warp_rlhf.cpu.gemm import input_gradient, product

CHUNK_BYTES = 2**22
"""Pieces of the logits this large stay in the CPU cache (logsumexp, entropy, the head's backward)."""


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


def entropy(logits: torch.Tensor, normaliser: torch.Tensor) -> torch.Tensor:
    """H = −Σ p log p = lse − Σ p z for p = softmax(z) over the last dimension (`normaliser`: lse,
    keepdim), in cache-sized pieces of rows, without a gradient."""
    rows, norms = logits.detach().reshape(-1, logits.shape[-1]), normaliser.detach().reshape(-1, 1)
    piece = max(1, CHUNK_BYTES // (rows.shape[-1] * rows.element_size()))
    parts = zip(rows.split(piece), norms.split(piece), strict=True)
    values = [lse.squeeze(-1) - torch.linalg.vecdot(torch.sub(z, lse).exp_(), z) for z, lse in parts]
    return torch.cat(values).view(logits.shape[:-1])


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
        grad_weight = grad_out.flatten(0, -2).T @ hidden.flatten(0, -2) if ctx.needs_input_grad[2] else None
        grad_bias = grad_out.flatten(0, -2).sum(0) if ctx.has_bias and ctx.needs_input_grad[3] else None
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
    keeps its own forward. The input comes from a generator of its own: a draw from the global RNG
    would move what the rest of the process draws (LoRA's dropout) in its first training step only.
    """
    weight, eps = getattr(module, "weight", None), getattr(module, "variance_epsilon", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1 or not isinstance(eps, float):
        return False
    kind = type(module)
    if kind not in _RMS_NORM_CLASSES:
        with torch.no_grad():
            generator = torch.Generator(weight.device).manual_seed(0)
            x = torch.randn(3, weight.numel(), device=weight.device, dtype=weight.dtype, generator=generator)
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
    `act_fn`) saves gate(x) and up(x) instead of also act(gate(x)) and their product. Every
    RMSNorm whose arithmetic is Llama's saves x and its scale, not the normalised x. An input
    embedding tied to the output layer adds its gradient rows in place into the output layer's
    dense gradient when the backward pass runs inside the context (`_TiedRows`; after it, they go
    to autograd as a sparse gradient, which it adds out of place). Other modules are left as they
    are, and every module's own forward is back on exit.
    """
    patched: list[torch.nn.Module] = []
    rows = None
    try:
        for mlp in (m for m in model.modules() if _is_gated_mlp(m)):

            def forward(x: torch.Tensor, mlp=mlp) -> torch.Tensor:
                gate, up, down = mlp.gate_proj(x), mlp.up_proj(x), mlp.down_proj
                return _GatedProjection.apply(gate, up, down.weight, down.bias, mlp.act_fn)

            mlp.forward = forward
            patched.append(mlp)
        for norm in (m for m in model.modules() if _is_rms_norm(m)):
            norm.forward = lambda x, norm=norm: rms_norm(x, norm.weight, norm.variance_epsilon)
            patched.append(norm)
        embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
        if (
            isinstance(embedding, torch.nn.Embedding)
            and head is not None
            and embedding.weight is head.weight
            and embedding.weight.requires_grad  # frozen (LoRA): no gradient rows to add
            and embedding.max_norm is None
            and not embedding.scale_grad_by_freq
        ):
            rows = _TiedRows(embedding.weight)
            embedding.forward = lambda ids: _EmbeddingRows.apply(ids, embedding.weight, embedding.padding_idx, rows)
            patched.append(embedding)
        yield
    finally:
        for module in patched:
            del module.forward
        if rows is not None:
            rows.close()


class _TiedRows:
    """The tied embedding's gradient rows of a backward pass run inside `lean_backward`: added in
    place into the weight's gradient once the output layer's gradient is accumulated there (a
    post-accumulate-grad hook). A backward pass after the context gives its rows back to autograd
    as a sparse gradient instead."""

    def __init__(self, weight: torch.Tensor):
        self.pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.hook = weight.register_post_accumulate_grad_hook(self.add)

    @property
    def open(self) -> bool:
        return self.hook is not None

    def add(self, weight: torch.Tensor) -> None:
        if weight.grad is None:
            weight.grad = torch.zeros_like(weight)
        for ids, rows in self.pending:
            weight.grad.index_add_(0, ids, rows.to(weight.grad.dtype))
        self.pending.clear()

    def close(self) -> None:
        self.hook.remove()
        self.hook = None


class _EmbeddingRows(torch.autograd.Function):
    """weight[ids], whose weight gradient goes to `_TiedRows` as rows (ids, ∂rows)."""

    @staticmethod
    def forward(ctx, ids, weight, padding_idx, rows):
        ctx.save_for_backward(ids)
        ctx.padding_idx, ctx.rows, ctx.weight_shape = padding_idx, rows, weight.shape
        return torch.nn.functional.embedding(ids, weight, padding_idx)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (ids,) = ctx.saved_tensors
        ids, values = ids.flatten(), grad.reshape(-1, grad.shape[-1])
        if ctx.padding_idx is not None:  # the padding row gets no gradient, as in nn.Embedding
            keep = ids != ctx.padding_idx
            ids, values = ids[keep], values[keep]
        if ctx.rows.open:
            ctx.rows.pending.append((ids, values))
            return None, None, None, None
        sparse = torch.sparse_coo_tensor(ids[None], values, ctx.weight_shape, check_invariants=True)
        return None, sparse, None, None
