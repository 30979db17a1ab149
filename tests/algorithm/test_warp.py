"""The WARP loop: merges per iteration, LITI, the saved policy, learning, resume."""

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import PROMPT_TEXTS, good_fraction, hand_slerp, make_tokenizer, tiny_config, train_tiny_warp
from warp_rlhf import policy as pi
from warp_rlhf.algorithm.merge import copy_into, model_state
from warp_rlhf.algorithm.reinforce import Trainer
from warp_rlhf.stages.models import load_causal_lm
from warp_rlhf.stages.pipeline import save_policy


def test_each_iteration_is_slerp_of_task_vectors_then_liti_towards_the_merge(tiny_policy, tmp_path):
    config = tiny_config(tmp_path, liti_rate=0.3)
    (final, summaries), policy = train_tiny_warp(tmp_path, tiny_policy, config)
    sft = {k: v.clone() for k, v in model_state(load_causal_lm(str(tiny_policy))).items()}
    slerp_1 = load_file(tmp_path / "iter_1" / "slerp.safetensors")
    runs_1 = [load_file(tmp_path / "iter_1" / f"run_{m}" / "policy.safetensors") for m in (1, 2)]
    runs_2 = [load_file(tmp_path / "iter_2" / f"run_{m}" / "policy.safetensors") for m in (1, 2)]
    init_2 = {k: 0.7 * sft[k] + 0.3 * slerp_1[k] for k in sft}  # LITI with η = 0.3
    for name in sft:
        expected_1 = sft[name] + hand_slerp(runs_1[0][name] - sft[name], runs_1[1][name] - sft[name], 0.5)
        assert torch.allclose(slerp_1[name], expected_1, atol=1e-5), name
        expected_2 = init_2[name] + hand_slerp(runs_2[0][name] - init_2[name], runs_2[1][name] - init_2[name], 0.5)
        assert torch.allclose(final[name], expected_2, atol=1e-5), name
    init_files = [load_file(tmp_path / f"iter_{i}" / "init.safetensors") for i in (1, 2)]
    assert all(torch.equal(init_files[0][k], sft[k]) for k in sft)  # θ_init of each iteration, on disk
    assert all(torch.allclose(init_files[1][k], init_2[k], atol=1e-6) for k in sft)
    assert [s["iteration"] for s in summaries] == [1, 2] and len(summaries[0]["runs"]) == 2
    rows = [json.loads(line) for line in (tmp_path / "iter_2" / "run_1" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert set(rows[0]) >= {"reward_mean", "reward_std", "kl_to_anchor", "loss", "grad_norm", "entropy",
                            "completion_length", "seconds"}  # fmt: skip
    assert not (tmp_path / "iter_1" / "run_1" / "checkpoint").exists()


def test_final_policy_saves_and_loads_with_from_pretrained(tiny_policy, tmp_path):
    from transformers import AutoModelForCausalLM

    config = tiny_config(tmp_path, iterations=1, steps=2)
    (final, summaries), policy = train_tiny_warp(tmp_path, tiny_policy, config)
    save_policy(policy, make_tokenizer(), final, tmp_path / "final", config, {"iterations": summaries})
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    for name, tensor in model_state(loaded).items():
        assert torch.equal(tensor, final[name])
    assert "I=1, M=2, T=2" in (tmp_path / "final" / "README.md").read_text()
    assert (tmp_path / "final" / "model.safetensors").exists()


def test_reward_rises_and_warp_beats_the_sft_policy(tiny_policy, tmp_path):
    config = tiny_config(tmp_path, iterations=2, runs=2, steps=25, batch_size=16, learning_rate=1e-2, beta=0.01)
    (final, _), policy = train_tiny_warp(tmp_path, tiny_policy, config)
    for iteration in (1, 2):
        for run in (1, 2):
            done = json.loads((tmp_path / f"iter_{iteration}" / f"run_{run}" / "done.json").read_text())
            assert done["reward_last_10pct"] > done["reward_first_10pct"] + 0.1

    def mean_reward(state) -> float:
        model = load_causal_lm(str(tiny_policy))
        if state is not None:
            copy_into(model, state)
        torch.manual_seed(123)
        batch = pi.sample(model, make_tokenizer(), PROMPT_TEXTS * 4, temperature=0.9, max_new_tokens=5)
        return good_fraction(None, pi.decode(make_tokenizer(), batch)).mean().item()

    sft, warp = mean_reward(None), mean_reward(final)
    assert warp > sft + 0.2, (sft, warp)


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("stop_after", [3, 6, 11])
def test_resume_after_interruption_is_bitwise_equal_and_skips_finished_runs(tiny_policy, tmp_path, stop_after):
    config = tiny_config(tmp_path, steps=4, checkpoint_every=2)
    (reference, _), _ = train_tiny_warp(tmp_path / "uninterrupted", tiny_policy, config)

    calls = {"n": 0}
    original = Trainer.step

    def counting_step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > stop_after and calls.get("interrupt", True):
            raise Interrupt
        return original(self, *args, **kwargs)

    Trainer.step = counting_step
    try:
        with pytest.raises(Interrupt):
            train_tiny_warp(tmp_path / "resumed", tiny_policy, config)
        calls.update(n=0, interrupt=False)
        (resumed, _), _ = train_tiny_warp(tmp_path / "resumed", tiny_policy, config)
    finally:
        Trainer.step = original
    total = config.iterations * config.runs * config.steps
    finished_before = stop_after - stop_after % config.checkpoint_every  # steps kept by runs and checkpoints
    assert calls["n"] == total - finished_before
    for name, tensor in reference.items():
        assert torch.equal(resumed[name], tensor), name


def test_train_command_refuses_an_unfinished_run_without_resume(tiny_args, tmp_path, capsys, monkeypatch):
    from warp_rlhf.algorithm.reinforce import TrainingError
    from warp_rlhf.cli import main

    def fail(*_):
        raise TrainingError("the loss is not finite")

    args = ["train", *tiny_args, "--steps", "2", "--batch_size", "4", "--iterations", "1", "--reward_epochs", "0.2"]
    with monkeypatch.context() as patched, pytest.raises(SystemExit):
        patched.setattr(Trainer, "step", fail)
        main(args)  # an unfinished run: iter_1/run_1 begun
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        main(args)
    assert stop.value.code == 2 and "unfinished warp run: pass --resume" in capsys.readouterr().err
    assert main([*args, "--resume"]) == 0
    assert (tmp_path / "run" / "final" / "config.json").exists()
    assert "from_pretrained" in capsys.readouterr().out
