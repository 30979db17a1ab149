"""Fixtures: tiny random-init models, a tiny word-level tokenizer and synthetic reviews, all on disk.

Saved to folders and passed by path, they exercise the same `from_pretrained` /
`load_dataset` code that hub names go through. Shared helpers live in `tests.helpers`.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.helpers import VOCAB, make_tokenizer, write_reviews_csv

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, os.cpu_count() or 1))


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
