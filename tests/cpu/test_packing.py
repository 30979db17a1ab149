import pytest
import torch

from tests.helpers import make_tokenizer
from warp_rlhf.cpu import packing
from warp_rlhf.policy import logprobs as scoring
from warp_rlhf.policy import rollout, sampling
from warp_rlhf.stages.models import load_causal_lm

EOS = 2


@pytest.fixture
def policy(tiny_policy):
    return load_causal_lm(str(tiny_policy)).eval()


def ragged_rollout() -> rollout.Rollout:
    """Three prompts of 3, 1 and 2 tokens (left-padded), completions of 4, 2 (EOS) and 1 (EOS) tokens."""
    prompt_ids = torch.tensor([[7, 9, 11], [0, 0, 5], [0, 6, 8]])
    prompt_mask = torch.tensor([[1, 1, 1], [0, 0, 1], [0, 1, 1]])
    completion = torch.tensor([[12, 13, 14, 15], [16, EOS, EOS, EOS], [EOS, EOS, EOS, EOS]])
    return rollout.build_rollout(prompt_ids, prompt_mask, completion, [EOS])


@pytest.mark.parametrize("width", [1, 5, 128])
def test_pack_keeps_every_real_token_once_and_targets_predict_the_completion(width):
    batch = ragged_rollout()
    rows, targets = packing.pack(batch, width)
    flat_ids, flat_positions = rows.input_ids.flatten(), rows.position_ids.flatten()
    prompt_lengths, completion_lengths = [3, 1, 2], [4, 2, 1]
    real = sorted(batch.input_ids[batch.attention_mask.bool()].tolist())
    # every real token is in some segment; the rest is filler, which starts a segment of its own
    assert sum(prompt_lengths) + sum(completion_lengths) == len(real)
    for b in range(3):
        p, n = prompt_lengths[b], completion_lengths[b]
        for t in range(n):
            target = targets[b, t].item()
            assert flat_ids[target + 1].item() == batch.completion_ids[b, t].item()  # predicts y_t
            assert flat_positions[target].item() == p - 1 + t  # positions restart per segment
        for t in range(n, 4):  # after EOS: the segment's last token, masked out of ℓ
            assert targets[b, t].item() == targets[b, n - 1].item() + 1
    assert rows.input_ids.numel() <= 3 * max(p + n for p, n in zip(prompt_lengths, completion_lengths, strict=True))


def test_smallest_packing_minimises_rows_times_width_by_hand():
    # 2 rows, LPT: [5, 4, 2] and [5, 4] → fills 11 and 9, area 22; 3 rows → 24; 4 → 28; 5 → 25
    members, fill = packing._smallest_packing([5, 5, 4, 4, 2], width=10)
    assert sorted(fill) == [9, 11]
    placed = sorted(b for row in members for b, _ in row)
    assert placed == [0, 1, 2, 3, 4]
    lengths = [5, 5, 4, 4, 2]
    for row in members:
        spans = sorted((offset, offset + lengths[b]) for b, offset in row)
        assert spans[0][0] == 0 and all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))


def test_empty_prompt_is_refused():
    batch = rollout.build_rollout(torch.tensor([[0, 0]]), torch.tensor([[0, 0]]), torch.tensor([[5, EOS]]), [EOS])
    with pytest.raises(ValueError, match="prompt has no tokens"):
        packing.pack(batch)


def test_packed_logits_and_gradients_equal_the_padded_forward(policy):
    batch = ragged_rollout()
    assert packing.packs_exactly(policy, scoring.padded_logits) and packing.prefill_packs_exactly(policy)
    losses = {}
    for name, forward in [("padded", scoring.padded_logits), ("packed", packing.packed_logits)]:
        policy.zero_grad(set_to_none=True)
        logits = forward(policy, batch).float()
        loss = scoring.sequence_logprobs(logits, batch).sum()
        loss.backward()
        mask = batch.completion_mask.bool()
        losses[name] = (logits[mask].detach(), [p.grad.clone() for p in policy.parameters()])
    (a, grads_a), (b, grads_b) = losses["padded"], losses["packed"]
    assert torch.allclose(a, b, atol=1e-5)
    assert all(torch.allclose(x, y, atol=1e-5) for x, y in zip(grads_a, grads_b, strict=True))


@pytest.fixture
def gemma2():
    """Soft-caps its logits in the head (at ±0.5 here) and has sliding-window layers."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(
        vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, final_logit_softcapping=0.5, pad_token_id=0,
    )  # fmt: skip
    return Gemma2ForCausalLM(config).eval()


def test_head_post_processing_goes_through_packed_logits(gemma2):
    model = gemma2
    batch = ragged_rollout()
    with torch.no_grad():
        padded, packed = scoring.padded_logits(model, batch), packing.packed_logits(model, batch)
    mask = batch.completion_mask.bool()
    assert packed[mask].abs().max() <= 0.5  # capped at ±0.5
    assert torch.allclose(padded[mask], packed[mask], atol=1e-5)


class IgnoresPositionIds(torch.nn.Module):
    """Stands in for remote code that builds its own positions and masks: packing breaks it."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.model, name)

    def forward(self, position_ids=None, **kwargs):
        return self.model(**kwargs)


def test_a_model_that_ignores_packing_falls_back_to_the_padded_forward(policy):
    model = IgnoresPositionIds(policy)
    batch = ragged_rollout()
    assert not packing.packs_exactly(model, scoring.padded_logits)
    assert not packing.prefill_packs_exactly(model)
    with torch.no_grad():
        got = scoring.token_logits(model, batch, 1.0)
        expected = scoring.padded_logits(policy, batch)
    mask = batch.completion_mask.bool()
    assert torch.allclose(got[mask], expected[mask], atol=1e-6)


def test_packed_prefill_gives_the_padded_cache_and_logits(policy):
    batch = ragged_rollout()
    prompt_ids, prompt_mask = batch.input_ids[:, :3], batch.attention_mask[:, :3]
    step_ids = torch.tensor([[12], [16], [9]])
    results = []
    with torch.no_grad():
        for packed in (False, True):
            cache, first = packing.prefill(policy, prompt_ids, prompt_mask, packed=packed)
            assert cache.get_seq_length() == 3 and first.shape == (3, policy.config.vocab_size)
            mask = torch.cat([prompt_mask, torch.ones(3, 1, dtype=torch.long)], 1)
            positions = packing.position_ids(prompt_mask)[:, -1:] + 1
            step = policy(input_ids=step_ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True)
            results.append((first, step.logits[:, -1]))
    (padded_first, padded_step), (packed_first, packed_step) = results
    assert torch.allclose(padded_first, packed_first, atol=1e-5)
    assert torch.allclose(padded_step, packed_step, atol=1e-5)
    # and both equal a forward over each prompt alone
    for row, prompt in enumerate([[7, 9, 11], [5], [6, 8]]):
        alone = policy(input_ids=torch.tensor([prompt])).logits[0, -1]
        assert torch.allclose(packed_first[row], alone, atol=1e-5)


def test_a_sliding_window_cache_packs_the_training_forward_but_not_the_prefill(gemma2):
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicSlidingWindowLayer

    assert any(isinstance(layer, DynamicSlidingWindowLayer) for layer in DynamicCache(config=gemma2.config).layers)
    assert packing.packs_exactly(gemma2, scoring.padded_logits)
    assert not packing.prefill_packs_exactly(gemma2)
    torch.manual_seed(0)
    batch = sampling.sample(gemma2, make_tokenizer(), ["the movie", "a"], temperature=1.0, max_new_tokens=3)
    assert batch.completion_ids.shape[0] == 2


def test_pack_sequences_and_block_causal_mask_by_hand():
    rows = packing.pack_sequences([torch.tensor([5, 6]), torch.tensor([7, 8, 9])], width=8)
    assert rows.input_ids.tolist() == [[7, 8, 9, 5, 6]]  # longest first, one row of 5
    assert rows.position_ids.tolist() == [[0, 1, 2, 0, 1]]
    assert rows.starts.tolist() == [3, 0]
    mask = packing.block_causal_mask(rows)[0, 0].int().tolist()
    assert mask == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [0, 0, 0, 1, 0],
        [0, 0, 0, 1, 1],
    ]
