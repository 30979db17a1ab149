import math

import pytest
import torch

from tests.helpers import make_tokenizer
from warp_rlhf.cpu import activations, head
from warp_rlhf.policy import logprobs as scoring
from warp_rlhf.policy import rollout, sampling
from warp_rlhf.stages.models import load_causal_lm


@pytest.fixture
def policy(tiny_policy):
    return load_causal_lm(str(tiny_policy)).eval()


@pytest.fixture
def tokenizer():
    return make_tokenizer()


def brute_force_logprob(model, prompt_ids: list[int], completion: list[int], eos: int, temperature: float) -> float:
    """Σ_t log π(y_t | x, y_<t), one unpadded forward per token, stopping after EOS."""
    total, context = 0.0, list(prompt_ids)
    with torch.no_grad():
        for token in completion:
            logits = model(torch.tensor([context])).logits[0, -1] / temperature
            total += torch.log_softmax(logits, -1)[token].item()
            context.append(token)
            if token == eos:
                break
    return total


def test_completion_mask_counts_up_to_and_including_the_first_eos():
    ids = torch.tensor([[5, 2, 2, 7], [5, 6, 7, 8], [2, 5, 2, 5]])
    assert rollout.completion_mask(ids, [2]).tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sequence_logprob_equals_token_by_token_sum(policy, tokenizer, temperature):
    prompts = ["the movie was", "a", "the plot and the actor"]
    torch.manual_seed(0)
    batch = sampling.sample(policy, tokenizer, prompts, temperature=temperature, max_new_tokens=6)
    with torch.no_grad():
        got = scoring.sequence_logprobs(scoring.token_logits(policy, batch, temperature), batch)
    eos = tokenizer.eos_token_id
    for row, prompt in enumerate(prompts):
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        completion = batch.completion_ids[row][batch.completion_mask[row].bool()].tolist()
        expected = brute_force_logprob(policy, prompt_ids, completion, eos, temperature)
        assert abs(got[row].item() - expected) < 1e-4


def test_same_sequence_padded_differently_has_the_same_logprob(policy):
    prompt, completion, pad = torch.tensor([[7, 9, 11]]), torch.tensor([[12, 13, 2, 0]]), 0
    values = []
    for extra in (0, 1, 4):
        prompt_ids = torch.cat([torch.full((1, extra), pad), prompt], 1)
        prompt_mask = torch.cat([torch.zeros(1, extra, dtype=torch.long), torch.ones(1, 3, dtype=torch.long)], 1)
        batch = rollout.build_rollout(prompt_ids, prompt_mask, completion, [2])
        with torch.no_grad():
            values.append(scoring.sequence_logprobs(scoring.token_logits(policy, batch, 1.0), batch).item())
    assert max(values) - min(values) < 1e-5
    # And padding after EOS is excluded: changing a padded token does not change ℓ.
    other = rollout.build_rollout(prompt, torch.ones(1, 3, dtype=torch.long), torch.tensor([[12, 13, 2, 17]]), [2])
    with torch.no_grad():
        assert abs(scoring.sequence_logprobs(scoring.token_logits(policy, other, 1.0), other).item() - values[0]) < 1e-5


def test_sampling_stops_at_eos_or_max_new_tokens(policy, tokenizer):
    torch.manual_seed(1)
    batch = sampling.sample(policy, tokenizer, ["the movie"] * 32, temperature=1.0, max_new_tokens=5)
    assert batch.completion_ids.shape[1] <= 5
    lengths = batch.completion_lengths
    assert (lengths >= 1).all() and (lengths <= 5).all()
    texts = rollout.decode(tokenizer, batch)
    assert all("<eos>" not in text and "<pad>" not in text for text in texts)


def test_sampling_is_reproducible_under_a_seed_and_varies_without(policy, tokenizer):
    def draw(seed):
        torch.manual_seed(seed)
        return sampling.sample(policy, tokenizer, ["the movie"] * 8, temperature=1.0, max_new_tokens=6).input_ids

    assert torch.equal(draw(3), draw(3))
    assert not torch.equal(draw(3), draw(4))


def test_rows_slices_a_micro_batch(policy, tokenizer):
    torch.manual_seed(0)
    batch = sampling.sample(policy, tokenizer, ["a", "the movie", "it"], temperature=1.0, max_new_tokens=3)
    part = batch.rows(1, 3)
    assert torch.equal(part.input_ids, batch.input_ids[1:3]) and part.prompt_length == batch.prompt_length


def test_generation_logits_equal_a_full_forward(policy, tokenizer):
    torch.manual_seed(2)
    batch, logits = sampling.sample(
        policy, tokenizer, ["the movie", "a"], temperature=0.7, max_new_tokens=5, with_logits=True
    )
    with torch.no_grad():
        full = scoring.token_logits(policy, batch, 0.7)
    mask = batch.completion_mask.bool()
    assert torch.allclose(torch.log_softmax(logits, -1)[mask], torch.log_softmax(full, -1)[mask], atol=1e-4)


def test_token_logits_with_a_gradient_divide_by_tau_out_of_place(policy, tokenizer):
    torch.manual_seed(4)
    batch = sampling.sample(policy, tokenizer, ["the movie", "a"], temperature=0.7, max_new_tokens=4)
    with torch.no_grad():
        plain = scoring.token_logits(policy, batch, 0.7)
    logits = scoring.token_logits(policy, batch, 0.7)
    # in place, the backward pass would go through CopySlices, which copies the whole gradient
    assert type(logits.grad_fn).__name__ == "DivBackward0"
    assert torch.allclose(logits, plain, atol=1e-5)


def test_sample_categorical_draws_from_the_softmax():
    torch.manual_seed(0)
    logits = torch.tensor([[0.0, 1.0, 2.0, -1.0, float("-inf")], [3.0, 0.0, 0.0, 0.0, 0.0]])
    draws = torch.stack([sampling.sample_categorical(logits) for _ in range(20000)])
    for row in range(2):
        frequency = torch.bincount(draws[:, row], minlength=5).float() / len(draws)
        assert torch.allclose(frequency, torch.softmax(logits[row], -1), atol=0.012), frequency
    assert (draws[:, 0] != 4).all()  # a zero-probability token is never drawn


def test_mean_entropy_by_hand():
    # row 1: uniform over 4 tokens (H = log 4), then p = (1/2, 1/4, 1/4, 0⁺); row 2: masked after one token
    half = torch.log(torch.tensor([2.0, 1.0, 1.0, 1e-30]))
    logits = torch.stack([torch.stack([torch.zeros(4), half]), torch.stack([half, torch.zeros(4)])])
    batch = rollout.Rollout(torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3), torch.tensor([[1, 1], [1, 0]]), 1)
    h_half = 1.5 * math.log(2)  # −(½ log ½ + 2 · ¼ log ¼)
    want = (math.log(4) + h_half + h_half) / 3
    entropy = activations.entropy(logits, torch.logsumexp(logits, -1, keepdim=True))
    assert torch.allclose(entropy, torch.tensor([[math.log(4), h_half], [h_half, math.log(4)]]), atol=1e-6)
    assert rollout.mean_entropy(entropy, batch) == pytest.approx(want, abs=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_completion_logprobs_fused_equal_the_logits_path_with_gradients(policy, tokenizer, temperature):
    torch.manual_seed(5)
    batch = sampling.sample(policy, tokenizer, ["the movie", "a", "it was"], temperature=0.9, max_new_tokens=5)
    assert head.fuses_head(policy, scoring.padded_logits)
    weights = torch.randn(batch.completion_mask.shape)
    results = []
    for fused in (True, False):
        policy.zero_grad(set_to_none=True)
        if fused:
            logprobs, entropy = scoring.completion_logprobs(policy, batch, temperature, with_entropy=True)
        else:
            logits = scoring.token_logits(policy, batch, temperature)
            log_p = torch.log_softmax(logits, -1)
            logprobs = log_p.gather(-1, batch.completion_ids[..., None]).squeeze(-1)
            entropy = -(log_p.exp() * log_p).sum(-1).detach()
        (logprobs * weights * batch.completion_mask).sum().backward()
        results.append((logprobs.detach(), entropy, [p.grad.clone() for p in policy.parameters()]))
    (fused_logp, fused_entropy, fused_grads), (logp, entropy, grads) = results
    assert torch.allclose(fused_logp, logp, atol=1e-5) and torch.allclose(fused_entropy, entropy, atol=1e-5)
    for ours, theirs in zip(fused_grads, grads, strict=True):
        assert torch.allclose(ours, theirs, atol=1e-5, rtol=1e-4)


def test_a_head_with_post_processing_is_not_fused(tiny_policy):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(
        vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, final_logit_softcapping=0.5, pad_token_id=0,
    )  # fmt: skip
    model = Gemma2ForCausalLM(config).eval()
    assert not head.fuses_head(model, scoring.padded_logits)  # the logits are capped after the head
    batch = rollout.Rollout(torch.randint(3, 32, (2, 5)), torch.ones(2, 5, dtype=torch.long),
                            torch.ones(2, 3, dtype=torch.long), 2)  # fmt: skip
    logprobs, _ = scoring.completion_logprobs(model, batch, 1.0)
    with torch.no_grad():
        logits = scoring.padded_logits(model, batch)
    expected = torch.log_softmax(logits, -1).gather(-1, batch.completion_ids[..., None]).squeeze(-1)
    assert torch.allclose(logprobs, expected, atol=1e-5)


def test_a_seeded_generator_samples_what_the_seeded_global_rng_did_and_leaves_it_alone(policy, tokenizer):
    """The old way (seed the global RNG, then sample) and the new one (a generator seeded alike)
    give the same tokens, and the new one draws nothing from the global RNG."""
    prompts, seed = ["the movie", "a film was", "it"] * 3, 1234
    torch.manual_seed(seed)
    old = sampling.sample(policy, tokenizer, prompts, temperature=0.9, max_new_tokens=6)
    state = torch.get_rng_state()
    generator = torch.Generator().manual_seed(seed)
    new = sampling.sample(policy, tokenizer, prompts, temperature=0.9, max_new_tokens=6, generator=generator)
    assert torch.equal(old.input_ids, new.input_ids) and torch.equal(old.completion_mask, new.completion_mask)
    assert torch.equal(torch.get_rng_state(), state)


def test_drawing_from_a_generator_continues_its_stream_and_restores_the_global_rng():
    generator = torch.Generator().manual_seed(7)
    torch.rand(3, generator=generator)  # a stream already under way
    expected = torch.rand(4, generator=torch.Generator().manual_seed(7))[3:]
    torch.manual_seed(99)
    state = torch.get_rng_state()
    with sampling.drawing_from(generator):
        drawn = torch.rand(1)  # no generator argument: the global RNG, now the generator's stream
    assert torch.equal(drawn, expected)
    assert torch.equal(torch.get_rng_state(), state)
