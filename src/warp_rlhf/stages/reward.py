"""The reward r(x, y): a Bradley–Terry reward model, and the independent VADER judge.

Training minimises −log σ(r(chosen) − r(rejected)) over (positive, negative) review pairs
with TRL's `RewardTrainer` (pre-tokenised pairs, since TRL appends an EOS token that BERT
tokenizers lack). The held-out metric is pairwise accuracy: P[r(chosen) > r(rejected)].
"""

from __future__ import annotations

import contextlib
import random
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from warp_rlhf.checkpoint import atomic_dir, write_json
from warp_rlhf.config import WarpConfig
from warp_rlhf.errors import ModelError
from warp_rlhf.layout import REWARD_METRICS
from warp_rlhf.stages.models import context_window, load_tokenizer, loading, model_config


def text_limit(model_config, tokenizer) -> int:
    """The most tokens a text keeps: the tokenizer's limit, the model's positions, and 512 at most
    (longer texts are truncated, as an encoder cannot read past its position embeddings)."""
    positions = context_window(model_config) or 512
    if getattr(model_config, "model_type", None) in {"roberta", "xlm-roberta", "camembert"}:
        positions -= 2  # their first two positions are reserved (padding offset)
    return min(tokenizer.model_max_length, positions, 512)


class RewardModel:
    """Scores texts with one output of a sequence-classification model, used as it is.

    A model with one output is scored by it; a model with several needs `output`, a label name
    (as in its `id2label`, any case) or an index: never a silent `logits[:, 0]`, which for the
    classic two-label IMDB classifier is its NEGATIVE score.
    """

    def __init__(
        self, model, tokenizer, *, output: str | None = None, batch_size: int = 64, name: str = "reward model"
    ):
        self.index = output_index(model.config, output, name)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = text_limit(model.config, tokenizer)

    @classmethod
    def from_pretrained(
        cls, path: str | Path, *, output: str | None = None, device: str = "cpu", trust_remote_code: bool = False
    ):
        from transformers import AutoModelForSequenceClassification

        tokenizer = load_tokenizer(str(path), trust_remote_code=trust_remote_code)
        with loading(str(path), "reward model"):
            model = AutoModelForSequenceClassification.from_pretrained(str(path), trust_remote_code=trust_remote_code)
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        return cls(model.to(device), tokenizer, output=output, name=f"reward model {path}")

    @torch.no_grad()
    def score(self, texts: list[str]) -> torch.Tensor:
        """r(text) for each text, as a float32 CPU tensor."""
        device = next(self.model.parameters()).device
        scores = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(
                texts[start : start + self.batch_size],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(device)
            scores.append(self.model(**batch).logits[:, self.index].float().cpu())
        return torch.cat(scores) if scores else torch.empty(0)


def output_index(config, output: str | None, name: str) -> int:
    """The logit that is the reward: the only one, or the one `output` names (a label or an index)."""
    labels = [str(config.id2label.get(i, i)) for i in range(config.num_labels)]
    if output is None:
        if config.num_labels == 1:
            return 0
        raise ModelError(
            f"{name} gives {config.num_labels} scores per text ({', '.join(labels)}): choose the reward as "
            f"{name.split()[-1]}[{labels[-1]}]"
        )
    if output.isdigit() and int(output) < config.num_labels:
        return int(output)
    by_name = {label.lower(): i for i, label in enumerate(labels)}
    if output.lower() not in by_name:
        raise ModelError(f"{name} has no output '{output}' (its outputs: {', '.join(labels)})")
    return by_name[output.lower()]


def pairwise_accuracy(reward: RewardModel, pairs: list[tuple[str, str]]) -> float:
    """Fraction of pairs where the chosen text scores strictly above the rejected one."""
    chosen, rejected = zip(*pairs, strict=True)
    return (reward.score(list(chosen)) > reward.score(list(rejected))).float().mean().item()


def judge_scores(texts: list[str]) -> list[float]:
    """The independent judge: VADER's compound sentiment score in [−1, 1]."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    analyzer = SentimentIntensityAnalyzer()
    return [analyzer.polarity_scores(text)["compound"] for text in texts]


def train_reward_model(
    config: WarpConfig,
    backbone: str,
    train_pairs: list[tuple[str, str]],
    eval_pairs: list[tuple[str, str]],
    output: Path,
) -> dict:
    """Train a Bradley–Terry reward model and save it (model, tokenizer, metrics) to `output`.

    The folder appears only when complete; its `metrics.json` holds held-out pairwise accuracy.
    TRL loads the backbone and draws the new score head after seeding with `seed` (as HF's
    Trainer then seeds its data order); the caller's global RNGs are put back afterwards.
    """
    with global_rng_kept():
        return _train_reward_model(config, backbone, train_pairs, eval_pairs, output)


@contextlib.contextmanager
def global_rng_kept() -> Iterator[None]:
    """Python's, NumPy's and torch's global RNGs as they were on entry, on exit: HF's Trainer
    seeds all three with its `seed`."""
    python, numpy = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=list(range(torch.cuda.device_count()))):
            yield
    finally:
        random.setstate(python)
        np.random.set_state(numpy)


def _train_reward_model(
    config: WarpConfig,
    backbone: str,
    train_pairs: list[tuple[str, str]],
    eval_pairs: list[tuple[str, str]],
    output: Path,
) -> dict:
    from datasets import Dataset
    from trl import RewardConfig

    started = time.perf_counter()
    tokenizer = load_tokenizer(backbone, trust_remote_code=config.trust_remote_code)
    backbone_config = model_config(backbone, "reward_model", trust_remote_code=config.trust_remote_code)
    max_length = text_limit(backbone_config, tokenizer)

    def ids(texts: list[str]) -> list[list[int]]:
        return tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]

    chosen, rejected = (list(column) for column in zip(*train_pairs, strict=True))
    dataset = Dataset.from_dict({"chosen_ids": ids(chosen), "rejected_ids": ids(rejected)})
    use_cpu = not torch.cuda.is_available()
    with atomic_dir(output) as tmp:
        args = RewardConfig(
            output_dir=str(tmp / "trainer"),
            num_train_epochs=config.reward_epochs,
            per_device_train_batch_size=config.reward_batch_size,
            learning_rate=config.reward_learning_rate,
            lr_scheduler_type="linear",
            warmup_steps=0.05,
            seed=config.seed,  # the score head's initialisation and the data order
            data_seed=config.seed,
            model_init_kwargs={"dtype": "auto", "device_map": None, "trust_remote_code": config.trust_remote_code},
            use_cpu=use_cpu,
            bf16=False,
            activation_checkpointing=False,
            save_strategy="no",
            report_to="none",
            logging_steps=25,
            max_length=None,
            dataloader_num_workers=0,
        )
        trainer = _reward_trainer(backbone, args, dataset, tokenizer)
        result = trainer.train()
        shutil.rmtree(tmp / "trainer", ignore_errors=True)
        scorer = RewardModel(trainer.model.eval(), tokenizer)
        metrics = {
            "eval_pairwise_accuracy": pairwise_accuracy(scorer, eval_pairs),
            "train_pairwise_accuracy_sample": pairwise_accuracy(scorer, train_pairs[: len(eval_pairs)]),
            "train_loss": result.training_loss,
            "train_pairs": len(train_pairs),
            "eval_pairs": len(eval_pairs),
            "backbone": backbone,
            "seconds": time.perf_counter() - started,
        }
        trainer.model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / REWARD_METRICS, metrics)
    return metrics


def _reward_trainer(backbone: str, args, dataset, tokenizer):
    """TRL's `RewardTrainer` on the backbone with a new one-output head (its load report hushed)."""
    from transformers.utils import logging as hf_logging
    from trl import RewardTrainer

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # silence "newly initialised head" for the score layer
    try:
        with loading(backbone, "reward_model"):
            return RewardTrainer(model=backbone, args=args, train_dataset=dataset, processing_class=tokenizer)
    finally:
        hf_logging.set_verbosity(verbosity)
