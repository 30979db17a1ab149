"""num_generations G: B / G prompts per batch with G completions each, and the baselines per prompt
(group_mean, group_loo), by hand: the advantages alone, then a whole step's gradient recomputed
from the same samples, for G = 1, 2, 4, with micro-batches, with LoRA."""

import pytest
import torch

from tests.helpers import PROMPTS, CapturingSGD, NoSchedule, good_fraction, make_tokenizer, tiny_config
from warp_rlhf import policy as pi
from warp_rlhf.algorithm.reinforce import Prompt, RunSpec, Trainer, advantages, derived_seed, prompt_batch
from warp_rlhf.config import WarpConfig
from warp_rlhf.errors import ConfigError
from warp_rlhf.layout import RunFolder
from warp_rlhf.stages.models import load_causal_lm


def test_baselines_per_prompt_by_hand():
    r = torch.tensor([1.0, 3.0, 2.0, 6.0])
    # G = 2: prompts (1, 3) and (2, 6)
    assert torch.allclose(advantages(r, "group_mean", 2), torch.tensor([-1.0, 1.0, -2.0, 2.0]))
    assert torch.allclose(advantages(r, "group_loo", 2), torch.tensor([1 - 3.0, 3 - 1.0, 2 - 6.0, 6 - 2.0]))
    # G = 4: one prompt; its mean is 3, the others' means 11/3, 9/3, 10/3, 6/3
    assert torch.allclose(advantages(r, "group_mean", 4), torch.tensor([-2.0, 0.0, -1.0, 3.0]))
    assert torch.allclose(advantages(r, "group_loo", 4), torch.tensor([1 - 11 / 3, 3 - 3.0, 2 - 10 / 3, 6 - 2.0]))
    # G = 1 (the paper): the baselines over the batch are as they were
    assert torch.equal(advantages(r, "none"), r)
    assert torch.allclose(advantages(r, "loo", 1), torch.tensor([1 - 11 / 3, 0.0, 2 - 10 / 3, 4.0]))


def test_a_batch_holds_b_over_g_prompts_g_times_each(tmp_path):
    prompts = [Prompt(f"p{i}") for i in range(16)]
    spec = RunSpec(1, 1, RunFolder(tmp_path), 0.1)
    one = [p.text for p in prompt_batch(prompts, tiny_config(tmp_path, batch_size=4), spec, 1)]
    four = [p.text for p in prompt_batch(prompts, tiny_config(tmp_path, batch_size=16, num_generations=4), spec, 1)]
    assert four == [text for text in one for _ in range(4)]  # the same prompts, in the same order


@pytest.mark.parametrize(
    ("fields", "message"),
    [({"batch_size": 6, "num_generations": 4}, "num_generations=4 is out of range: must divide batch_size"),
     ({"baseline": "group_loo"}, "needs num_generations >= 2")],
)  # fmt: skip
def test_generations_that_cannot_form_groups_are_refused(fields, message):
    with pytest.raises(ConfigError, match=message):
        WarpConfig(**fields)


def hand_advantages(r_beta: list[float], baseline: str, group: int) -> list[float]:
    """A_b = r_β,b − baseline_b, one row at a time, from the definitions: the mean of the batch or of
    the row's group (G consecutive rows), or of the others in it."""
    if baseline == "none":
        return r_beta
    out = []
    for b, value in enumerate(r_beta):
        first = b - b % group if baseline.startswith("group_") else 0
        members = r_beta[first : first + group] if baseline.startswith("group_") else r_beta
        others = members[: b - first] + members[b - first + 1 :]
        out.append(value - (sum(members) / len(members) if baseline.endswith("mean") else sum(others) / len(others)))
    return out


@pytest.mark.parametrize(
    ("group", "accumulation", "baseline"),
    [(1, 1, "none"), (2, 1, "group_loo"), (2, 2, "group_mean"), (4, 1, "group_mean"), (4, 4, "group_loo"),
     (4, 2, "loo")],
)  # fmt: skip
@pytest.mark.parametrize("lora_r", [0, 2])
def test_a_step_with_g_completions_per_prompt_is_reinforce_with_its_baseline_by_hand(
    tiny_policy, tmp_path, group, accumulation, baseline, lora_r
):
    """Batch 8 of 8 / G prompts; with accumulation 4 and G = 4 a group spans two micro-batches."""
    if lora_r:
        pytest.importorskip("peft", reason="LoRA needs the [lora] extra, which `make test` installs")
    config = tiny_config(tmp_path, batch_size=8, num_generations=group, grad_accumulation_steps=accumulation,
                         baseline=baseline, beta=0.5, lora_r=lora_r)  # fmt: skip
    trainer = Trainer(config, load_causal_lm(str(tiny_policy)), make_tokenizer(), good_fraction, PROMPTS)
    spec = RunSpec(1, 1, RunFolder(tmp_path), config.ema_rate)
    with torch.no_grad():  # an anchor apart from the policy: r_β differs between a prompt's completions
        for tensor in trainer.anchor_state.values():
            tensor.add_(0.05 * torch.randn(tensor.shape, generator=torch.Generator().manual_seed(1)))

    prompts = prompt_batch(PROMPTS, config, spec, 0)
    assert len({id(p) for p in prompts}) == 8 // group
    generator = torch.Generator().manual_seed(derived_seed(config.seed, 1, 1, "step", 0))
    texts = [p.text for p in prompts]
    batch = pi.sample(trainer.policy, trainer.tokenizer, texts, temperature=config.temperature, max_new_tokens=5,
                      generator=generator)  # fmt: skip
    r = good_fraction(prompts, pi.decode(trainer.tokenizer, batch))
    logp = pi.sequence_logprobs(pi.token_logits(trainer.policy, batch, config.temperature), batch)
    with torch.no_grad():
        logp_ema = pi.sequence_logprobs(pi.token_logits(trainer.anchor, batch, config.temperature), batch)
    r_beta = (r - 0.5 * (logp.detach() - logp_ema)).tolist()
    advantage = torch.tensor(hand_advantages(r_beta, baseline, group))
    (-(advantage * logp).sum() / 8).backward()
    expected = {n: p.grad.clone() for n, p in trainer.policy.named_parameters() if p.grad is not None}
    trainer.policy.zero_grad(set_to_none=True)

    optimizer = CapturingSGD(trainer.policy, lr=0.0)
    metrics = trainer.step(spec, 0, optimizer, NoSchedule())
    assert optimizer.grads.keys() == expected.keys() and expected
    for name, grad in expected.items():
        assert torch.allclose(optimizer.grads[name], grad, atol=1e-6), name
    assert metrics.loss == pytest.approx(-(advantage * logp.detach()).sum().item() / 8, abs=1e-5)
