"""Tiny random-init models, a tiny word-level tokenizer and synthetic reviews, all on disk.

Saved to folders and passed by path, they exercise the same `from_pretrained` /
`load_dataset` code that hub names go through.
"""

from __future__ import annotations

import csv
import os
import random
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, os.cpu_count() or 1))

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


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny")


@pytest.fixture(scope="session")
def tiny_policy(tiny_dir) -> Path:
    """A 2-layer Llama with the tiny vocabulary, saved with its tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tokenizer = make_tokenizer()
    config = LlamaConfig(
        vocab_size=len(VOCAB),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
    )
    path = tiny_dir / "policy"
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_backbone(tiny_dir) -> Path:
    """A 2-layer BERT encoder (no head) with the tiny vocabulary."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    tokenizer = make_tokenizer()
    config = BertConfig(
        vocab_size=len(VOCAB),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
    )
    path = tiny_dir / "backbone"
    BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def reviews_csv(tiny_dir) -> Path:
    return write_reviews_csv(tiny_dir / "reviews.csv", 400)


@pytest.fixture
def tiny_args(tiny_policy, tiny_backbone, reviews_csv, tmp_path) -> list[str]:
    """CLI flags for a run on the tiny models and synthetic reviews."""
    return [
        "--policy", str(tiny_policy),
        "--reward_model", str(tiny_backbone),
        "--dataset", str(reviews_csv),
        "--output_dir", str(tmp_path / "run"),
        "--reward_train_pairs", "80",
        "--reward_eval_pairs", "40",
        "--rl_prompts", "40",
        "--eval_prompts", "20",
        "--max_new_tokens", "6",
    ]  # fmt: skip
