"""The one smoke test on the real embedded assets (converted once into the user cache)."""

import pytest
import torch

from warp_rlhf.config import WarpConfig
from warp_rlhf.stages import assets
from warp_rlhf.stages.models import load_causal_lm, load_tokenizer
from warp_rlhf.stages.reward import RewardModel

pytestmark = pytest.mark.slow


def test_embedded_policy_and_reward_backbone_load_and_run():
    config = WarpConfig()
    policy_path = assets.resolve_policy(config)
    tokenizer = load_tokenizer(policy_path, padding_side="left")
    policy = load_causal_lm(policy_path)
    assert type(policy).__name__ == "LlamaForCausalLM" and policy.config.vocab_size == 49152
    assert not hasattr(policy.config, "quantization_config")
    assert policy.dtype == torch.float32
    batch = tokenizer(["This movie was", "I watched it and"], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = policy(**batch).logits
    assert torch.isfinite(logits).all()
    # A real language model: a common continuation is far likelier than a random token.
    last = logits[0, -1].log_softmax(-1)
    assert last.max() > last.mean() + 10
    completion = policy.generate(**batch, max_new_tokens=4, do_sample=False)
    assert completion.shape == (2, batch["input_ids"].shape[1] + 4)

    from transformers import AutoModelForSequenceClassification

    backbone = assets.resolve_backbone(config)
    model = AutoModelForSequenceClassification.from_pretrained(backbone, num_labels=1)
    reward = RewardModel(model, load_tokenizer(backbone))
    scores = reward.score(["A wonderful film.", "A dreadful film.", "It was okay."])
    assert scores.shape == (3,) and torch.isfinite(scores).all()
