"""KL estimators against the exact sequence KL, enumerated over every possible completion."""

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tests.helpers import make_tokenizer
from warp_rlhf.algorithm.reinforce import Prompt
from warp_rlhf.stages.compare import mean_and_se
from warp_rlhf.stages.evaluate import distinct_n, sample_policy, token_kl
from warp_rlhf.stages.rewards import Reward, Rewards

SMALL_VOCAB = ["<pad>", "<unk>", "<eos>", "x", "a", "b", "c"]
EOS = 2


def small_model(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(SMALL_VOCAB), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16, initializer_range=0.6,
        pad_token_id=0, eos_token_id=EOS, bos_token_id=None,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


@torch.no_grad()
def exact_sequence_kl(policy, reference, prompt: list[int], max_new_tokens: int, temperature: float) -> float:
    """Σ_y π(y) log(π(y)/π_ref(y)) over every completion: ending at EOS, or at the length limit."""
    total = 0.0

    def walk(context: list[int], logp: float, logq: float, depth: int) -> None:
        nonlocal total
        ids = torch.tensor([context])
        dist_p = torch.log_softmax(policy(ids).logits[0, -1] / temperature, -1)
        dist_q = torch.log_softmax(reference(ids).logits[0, -1] / temperature, -1)
        for token in range(len(SMALL_VOCAB)):
            lp, lq = logp + dist_p[token].item(), logq + dist_q[token].item()
            if token == EOS or depth + 1 == max_new_tokens:
                total += math.exp(lp) * (lp - lq)
            else:
                walk([*context, token], lp, lq, depth + 1)

    walk(prompt, 0.0, 0.0, 0)
    return total


NO_REWARD = Rewards([Reward("zero", 1.0, lambda prompts, completions, ids=None: [0.0] * len(completions))])
X = [Prompt("x")]


@pytest.mark.parametrize("temperature", [1.0, 0.8])
def test_both_kl_estimators_agree_with_the_enumerated_sequence_kl(temperature):
    policy, sft = small_model(1), small_model(2)
    tokenizer = make_tokenizer(SMALL_VOCAB)
    exact = exact_sequence_kl(policy, sft, [3], max_new_tokens=3, temperature=temperature)
    samples = sample_policy(
        policy, sft, tokenizer, X * 3000, temperature=temperature, max_new_tokens=3, seed=0,
        rewards=NO_REWARD, judge=None, batch_size=1000,
    )  # fmt: skip
    summary = samples.summary()
    assert exact > 0.05  # the two policies really differ
    for name in ("kl_k1", "kl_exact"):
        assert abs(summary[f"{name}_mean"] - exact) < 4 * summary[f"{name}_se"], (name, summary, exact)
    assert min(samples.kl_exact) >= -1e-6  # per-token KLs are never negative
    assert min(samples.kl_k1) < 0  # k1 can be
    assert summary["kl_exact_se"] < summary["kl_k1_se"]  # lower variance


def test_kl_of_a_policy_to_itself_is_zero():
    policy = small_model(1)
    samples = sample_policy(
        policy, policy, make_tokenizer(SMALL_VOCAB), X * 20, temperature=1.0, max_new_tokens=3, seed=0,
        rewards=NO_REWARD, judge=None,
    )  # fmt: skip
    assert max(map(abs, samples.kl_k1)) < 1e-5 and max(map(abs, samples.kl_exact)) < 1e-5


def test_token_kl_by_hand():
    p, q = torch.tensor([[[0.0, math.log(3.0)]]]), torch.tensor([[[0.0, 0.0]]])
    expected = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert abs(token_kl(p, q, torch.ones(1, 1)).item() - expected) < 1e-6
    assert token_kl(p, q, torch.zeros(1, 1)).item() == 0.0


def test_standard_error_by_hand():
    mean, se = mean_and_se([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5 and math.isclose(se, math.sqrt((1.5**2 * 2 + 0.5**2 * 2) / 3 / 4))
    assert mean_and_se([5.0]) == (5.0, 0.0)


def test_distinct_n():
    assert distinct_n(["a b a b", "a c"], 1) == 3 / 6
    assert distinct_n(["a b a b", "a c"], 2) == 3 / 4


def test_evaluation_is_deterministic_for_a_seed():
    policy, sft = small_model(1), small_model(2)
    tokenizer = make_tokenizer(SMALL_VOCAB)

    def run(seed):
        return sample_policy(
            policy, sft, tokenizer, X * 30, temperature=1.0, max_new_tokens=3, seed=seed,
            rewards=NO_REWARD, judge=None, batch_size=7,
        ).summary()  # fmt: skip

    assert run(0) == run(0) and run(0) != run(1)
