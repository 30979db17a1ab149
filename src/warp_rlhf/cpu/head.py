"""The output layer and the token log-probs as one function, on CPU fp32.

For z = h Wᵀ / τ, log softmax(z)[y] = z_y − logsumexp z. Run as separate modules, the
training step makes three (N, V) tensors here: z / τ, its gradient, and that divided by τ.
`head_logprobs` makes none: its backward runs over pieces of the vocabulary, and each piece's
∂ℓ/∂z = (onehot(y) − softmax(z)) g goes straight into its rows of ∂W and into ∂h. It is taken
for a model whose logits are its output layer's product and nothing more (`fuses_head`, checked
once per model); a model with something after the head (Gemma 2's soft-capping) keeps its logits.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from warp_rlhf.cpu.activations import CHUNK_BYTES, entropy, logsumexp
from warp_rlhf.cpu.gemm import onednn_linears, product, runs_on_onednn
from warp_rlhf.cpu.probes import Batch, verdict

Forward = Callable[[torch.nn.Module, Batch], torch.Tensor]
"""A training forward: (model, batch) → logits at the completion positions, (B, L, V)."""


class _HeadLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, ids, temperature, with_entropy):
        logits = product(hidden, weight)
        if temperature != 1.0:
            logits.div_(temperature)  # its own tensor: in place, no copy
        normaliser = logsumexp(logits)
        ctx.temperature = temperature
        ctx.save_for_backward(hidden, weight, logits, normaliser, ids)
        token_entropy = entropy(logits, normaliser) if with_entropy else logits.new_empty(0)
        ctx.mark_non_differentiable(token_entropy)
        return (logits.gather(-1, ids.unsqueeze(-1)) - normaliser).squeeze(-1), token_entropy

    @staticmethod
    def backward(ctx, grad: torch.Tensor, _):
        hidden, weight, logits, normaliser, ids = ctx.saved_tensors
        # z = h Wᵀ / τ: ∂ℓ/∂z = (onehot(y) − softmax(z)) g, ∂h = (∂ℓ/∂z) W / τ, ∂W = (∂ℓ/∂z)ᵀ h / τ
        scale = grad / ctx.temperature
        rows, vocabulary = logits.shape
        grad_hidden = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.empty_like(weight) if ctx.needs_input_grad[1] else None
        columns = max(1, CHUNK_BYTES // (rows * logits.element_size()))
        buffer, row = logits.new_empty(rows, columns), torch.arange(rows, device=ids.device)
        for start in range(0, vocabulary, columns):
            stop = min(vocabulary, start + columns)
            piece = buffer[:, : stop - start]
            torch.sub(logits[:, start:stop], normaliser, out=piece).exp_().mul_(-scale.unsqueeze(-1))
            hit = (ids >= start) & (ids < stop)
            piece.index_put_((row[hit], ids[hit] - start), scale[hit], accumulate=True)
            if grad_weight is not None:
                torch.mm(piece.T, hidden, out=grad_weight[start:stop])
            if grad_hidden is not None:
                grad_hidden.addmm_(piece, weight[start:stop])
        return grad_hidden, grad_weight, None, None, None


def head_logprobs(
    hidden: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor, temperature: float, with_entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """For z = h Wᵀ / τ (rows of `hidden`, (N, d); `weight`, (V, d)): log softmax(z)[y], shape (N,),
    and with `with_entropy` H = −Σ p log p per row (no gradient), from the same z.

    The backward runs over `CHUNK_BYTES` of z's columns at a time, so no (N, V) gradient exists,
    and τ divides z in place once.
    """
    logprobs, token_entropy = _HeadLogprobs.apply(hidden, weight, ids, temperature, with_entropy)
    return logprobs, token_entropy if with_entropy else None


def head_completion_logprobs(
    model, forward: Forward, rollout: Batch, temperature: float, with_entropy: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log π(y_t | x, y_<t) of each completion token, (B, L), and with `with_entropy` its entropy,
    from the output layer's inputs and `head_logprobs` (call only where `fuses_head`)."""
    ids = rollout.completion_ids
    with onednn_linears(model):
        hidden = head_inputs(model, forward, rollout)
    weight = model.get_output_embeddings().weight
    logprobs, token_entropy = head_logprobs(hidden, weight, ids.flatten(), temperature, with_entropy)
    return logprobs.view_as(ids), token_entropy.view_as(ids) if with_entropy else None


def head_inputs(model, forward: Forward, rollout: Batch) -> torch.Tensor:
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


def fuses_head(model, forward: Forward) -> bool:
    """Whether the logits may be taken as h Wᵀ from `head_inputs`: an output layer that is a CPU
    fp32 `nn.Linear` without a bias, and logits that the model returns as that layer gave them (no
    soft-capping or scaling after it; checked once per model)."""
    head = model.get_output_embeddings()
    if not (isinstance(head, torch.nn.Linear) and head.bias is None and runs_on_onednn(head.weight)):
        return False

    def pairs(probe: Batch):
        logits = forward(model, probe)
        return [(logits, (head_inputs(model, forward, probe) @ head.weight.T).view_as(logits))]

    return verdict(model, "head", pairs)
