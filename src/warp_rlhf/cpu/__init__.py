"""Optional fast paths: the same numbers as the model's own forward, with less time or memory.

This is the one place the rest of warp-rlhf enters them. Each path steps aside where it does
not apply (a GPU, half precision or bf16 autocast, an architecture it does not know) or where its
once-per-model probe finds that it does not reproduce the model's own logits
(`probes.verdict`, logged once at debug level):

- `gemm`: linear layers on oneDNN's fp32 GEMM, weights packed once per generation;
- `packing`: padding-free forwards and prefill (sequences packed into rows);
- `decoding`: the decode step of Llama-architecture models written out in a few operations;
- `activations`: a backward pass that keeps less (`lean_backward`) and token log-probs whose
  backward makes one (N, V) tensor;
- `head`: the output layer and the log-softmax as one function, backward over vocabulary pieces;
- `runtime`: glibc's allocator settings, for a process's edge to call once.
"""

from warp_rlhf.cpu.activations import entropy, lean_backward, logsumexp, token_logprobs
from warp_rlhf.cpu.decoding import decoder, decodes_exactly
from warp_rlhf.cpu.gemm import onednn_linears
from warp_rlhf.cpu.head import fuses_head, head_completion_logprobs
from warp_rlhf.cpu.packing import packed_logits, packs_exactly, position_ids, prefill, prefill_packs_exactly
from warp_rlhf.cpu.runtime import keep_freed_memory

__all__ = [
    "decoder",
    "decodes_exactly",
    "entropy",
    "fuses_head",
    "head_completion_logprobs",
    "keep_freed_memory",
    "lean_backward",
    "logsumexp",
    "onednn_linears",
    "packed_logits",
    "packs_exactly",
    "position_ids",
    "prefill",
    "prefill_packs_exactly",
    "token_logprobs",
]
