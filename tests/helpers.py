"""Helpers shared by the tests: a tiny tokenizer and reviews, a reward, configs, and hand math."""

from __future__ import annotations

import csv
import math
import random
import signal
from pathlib import Path

import torch

from warp_rlhf.algorithm.merge import model_state
from warp_rlhf.algorithm.reinforce import Prompt, Trainer
from warp_rlhf.algorithm.warp import train_warp
from warp_rlhf.config import WarpConfig
from warp_rlhf.layout import OutputDir
from warp_rlhf.runners import RunJob, make_runner
from warp_rlhf.stages.models import load_causal_lm

POSITIVE_WORDS = ["good", "great", "wonderful", "superb", "lovely", "brilliant"]
NEGATIVE_WORDS = ["bad", "awful", "terrible", "boring", "dull", "horrible"]
NEUTRAL_WORDS = ["the", "movie", "film", "was", "plot", "actor", "a", "and", "story", "it", "scene", "is"]
SPECIALS = ["<pad>", "<unk>", "<eos>", "<cls>"]
VOCAB = SPECIALS + NEUTRAL_WORDS + POSITIVE_WORDS + NEGATIVE_WORDS


def make_tokenizer(vocab: list[str] = VOCAB):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>", cls_token="<cls>"
    )


def synthetic_review(rng: random.Random, positive: bool, words: int = 12) -> str:
    """Neutral words with sentiment words of one polarity sprinkled in."""
    sentiment = POSITIVE_WORDS if positive else NEGATIVE_WORDS
    return " ".join(rng.choice(sentiment) if rng.random() < 0.35 else rng.choice(NEUTRAL_WORDS) for _ in range(words))


def write_reviews_csv(path: Path, n: int, seed: int = 0, labels=(1, 0)) -> Path:
    rng = random.Random(seed)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        for i in range(n):
            positive = i % 2 == 0
            writer.writerow([synthetic_review(rng, positive) + " <br /><br />the end", labels[0 if positive else 1]])
    return path


PROMPT_TEXTS = ["the movie", "a film", "the plot was", "it is", "the actor and", "a story", "the scene", "it was"] * 4
PROMPTS = [Prompt(text) for text in PROMPT_TEXTS]


def good_fraction(prompts, completions, completion_ids=None):
    """An easy reward: the fraction of completion words that are 'good'."""
    return torch.tensor([sum(w == "good" for w in c.split()) / max(1, len(c.split())) for c in completions])


def tiny_config(tmp_path, **overrides) -> WarpConfig:
    values = dict(
        output_dir=str(tmp_path), iterations=2, runs=2, steps=4, batch_size=4, max_new_tokens=5,
        learning_rate=3e-3, ema_rate=0.1, beta=0.05, liti_rate=0.5, checkpoint_every=2, seed=0, device="cpu",
    )  # fmt: skip
    return WarpConfig(**(values | overrides))


def train_tiny_warp(out: Path, policy_path: Path, config: WarpConfig, reward=good_fraction):
    """WARP on the tiny policy with `backend: local`: ((θ_slerp^I, summaries), the policy)."""
    policy = load_causal_lm(str(policy_path))
    trainer = Trainer(config, policy, make_tokenizer(), reward, PROMPTS)
    runner = make_runner("local", RunJob(config, lambda: trainer), trainer)
    return train_warp(config, model_state(policy), OutputDir(Path(out)), runner), policy


class CapturingSGD:
    """Optimiser stand-in: records the gradient it is asked to apply (of the parameters that have
    one: with LoRA, the adapters), then takes an SGD step (lr 0: none)."""

    def __init__(self, model, lr: float):
        self.model, self.param_groups, self.grads = model, [{"lr": lr}], {}

    def step(self):
        self.grads = {n: p.grad.clone() for n, p in self.model.named_parameters() if p.grad is not None}
        with torch.no_grad():
            for p in self.model.parameters():
                if p.grad is not None:
                    p.sub_(self.param_groups[0]["lr"] * p.grad)

    def zero_grad(self, set_to_none=True):
        self.model.zero_grad(set_to_none=set_to_none)


class NoSchedule:
    def step(self):
        pass


def hand_slerp(d1: torch.Tensor, d2: torch.Tensor, lam: float) -> torch.Tensor:
    """Independent float64 SLERP on flattened vectors, with the spec's LERP fallback for a zero
    vector (a millionth of the other's norm) and for collinear ones."""
    a, b = d1.double().flatten(), d2.double().flatten()
    na, nb = float(a.norm()), float(b.norm())
    if min(na, nb) <= 1e-6 * max(na, nb):
        return ((1 - lam) * a + lam * b).reshape(d1.shape).float()
    omega = math.acos(max(-1.0, min(1.0, float((a @ b) / (na * nb)))))
    if math.sin(omega) < 1e-6:  # collinear: the spec's LERP fallback
        return ((1 - lam) * a + lam * b).reshape(d1.shape).float()
    out = (math.sin((1 - lam) * omega) * a + math.sin(lam * omega) * b) / math.sin(omega)
    return out.reshape(d1.shape).float()


SRC = Path(__file__).resolve().parents[1] / "src"
TRAIN_FLAGS = ["--iterations", "2", "--runs", "2", "--steps", "3", "--batch_size", "4", "--checkpoint_every", "1",
               "--reward_epochs", "0.5", "--learning_rate", "1e-3", "--device", "cpu"]  # fmt: skip
"""A small WARP run on the tiny models, with a checkpoint after every step."""


def default_ctrl_c() -> None:
    """Give SIGINT its default action: a child inherits an ignored SIGINT (tests started under
    `nohup`, `trap '' INT` or a CI runner), and Python then never raises KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def cli_process(args: list[str], env_extra: dict[str, str] | None = None, **options):
    """`warp-rlhf ARGS` in a subprocess running this checkout's source (`subprocess.Popen`), with
    Ctrl-C's default action however the tests were started (`default_ctrl_c`)."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=str(SRC), **(env_extra or {}))
    command = [sys.executable, "-m", "warp_rlhf.cli", *args]
    return subprocess.Popen(command, env=env, text=True, preexec_fn=default_ctrl_c, **options)


def same_weights(a: Path, b: Path) -> bool:
    """Whether two safetensors files hold bitwise the same tensors."""
    from safetensors.torch import load_file

    first, second = load_file(a), load_file(b)
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def cli_error(args: list[str], capsys) -> str:
    """Run `warp-rlhf ARGS` in this process expecting one error line and exit code 2; the line."""
    import pytest

    from warp_rlhf.cli import main

    with pytest.raises(SystemExit) as stop:
        main(args)
    lines = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and lines[-1].startswith("warp-rlhf: error: "), lines
    return lines[-1]


def share_reward_model(source: Path, target: Path) -> None:
    """Copy a run's reward model and splits, with warp-rlhf's record that it wrote them, into a new
    output folder: runs there then differ from `source`'s only in what they are given."""
    import shutil

    from warp_rlhf.layout import MANIFEST

    for shared in ("reward_model", "data"):
        shutil.copytree(source / shared, target / shared)
    shutil.copy(source / MANIFEST, target / MANIFEST)
