"""The policy as the algorithm sees it: a rollout batch, sampling, and token log-probabilities.

It imports nothing of warp-rlhf above it; the CPU fast paths it takes are in `warp_rlhf.cpu`.
"""

from warp_rlhf.policy.checkpointing import checkpointed
from warp_rlhf.policy.logprobs import completion_logprobs, sequence_logprobs, token_logits
from warp_rlhf.policy.rollout import Rollout, build_rollout, decode, mean_entropy, token_ids
from warp_rlhf.policy.sampling import drawing_from, encode_prompts, forked_rng, sample

__all__ = [
    "Rollout",
    "build_rollout",
    "checkpointed",
    "completion_logprobs",
    "decode",
    "drawing_from",
    "encode_prompts",
    "forked_rng",
    "mean_entropy",
    "sample",
    "sequence_logprobs",
    "token_ids",
    "token_logits",
]
