"""configs/gpt2-imdb.yaml through the same code as the embedded default, with tiny models of
the classic architectures (GPT-2 policy, DistilBERT reward backbone) saved to local folders and
a local dataset in the hub dataset's shape (`text`, `label`), passed as paths."""

import json
import random
from pathlib import Path

import pytest
import torch

from tests.helpers import VOCAB, make_tokenizer, synthetic_review
from warp_rlhf.cli import main

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def classic(tmp_path_factory):
    from datasets import Dataset
    from transformers import (
        DistilBertConfig,
        DistilBertForSequenceClassification,
        DistilBertModel,
        GPT2Config,
        GPT2LMHeadModel,
    )

    root = tmp_path_factory.mktemp("classic")
    tokenizer = make_tokenizer()
    tokenizer.pad_token = None  # like GPT-2's tokenizer: no pad token
    torch.manual_seed(0)
    GPT2LMHeadModel(
        GPT2Config(
            vocab_size=len(VOCAB), n_positions=64, n_embd=32, n_layer=2, n_head=2, eos_token_id=2, bos_token_id=2
        )
    ).save_pretrained(root / "gpt2")
    tokenizer.save_pretrained(root / "gpt2")
    DistilBertModel(
        DistilBertConfig(
            vocab_size=len(VOCAB),
            dim=32,
            hidden_dim=64,
            n_layers=2,
            n_heads=2,
            max_position_embeddings=64,
            pad_token_id=0,
        )  # fmt: skip
    ).save_pretrained(root / "distilbert")
    make_tokenizer().save_pretrained(root / "distilbert")
    classifier = DistilBertForSequenceClassification(
        DistilBertConfig(
            vocab_size=len(VOCAB),
            dim=32,
            hidden_dim=64,
            n_layers=2,
            n_heads=2,
            max_position_embeddings=64,
            pad_token_id=0,
            num_labels=2,
            id2label={0: "NEGATIVE", 1: "POSITIVE"},
            label2id={"NEGATIVE": 0, "POSITIVE": 1},
        )
    )  # fmt: skip  (the shape of lvwerra/distilbert-imdb: NEGATIVE is output 0, POSITIVE output 1)
    classifier.save_pretrained(root / "distilbert-imdb")
    make_tokenizer().save_pretrained(root / "distilbert-imdb")
    rng = random.Random(0)
    rows = [{"text": synthetic_review(rng, i % 2 == 0) + " <br />", "label": int(i % 2 == 0)} for i in range(300)]
    Dataset.from_list(rows).to_parquet(str(root / "imdb-train.parquet"))
    return root


def test_the_classic_config_runs_through_the_embedded_code_path(classic, tmp_path, capsys):
    args = [
        "run", "--config", str(REPO / "configs" / "gpt2-imdb.yaml"),
        "--policy", str(classic / "gpt2"), "--reward_model", str(classic / "distilbert"),
        "--dataset", str(classic / "imdb-train.parquet"), "--output_dir", str(tmp_path / "run"),
        "--reward_train_pairs", "60", "--reward_eval_pairs", "20", "--rl_prompts", "40", "--eval_prompts", "20",
        "--steps", "2", "--batch_size", "4", "--max_new_tokens", "5", "--front_points", "3",
        "--trajectory_points", "1", "--reward_epochs", "0.5", "--device", "cpu",
    ]  # fmt: skip
    assert main(args) == 0
    saved = (tmp_path / "run" / "config.yaml").read_text()
    assert "slerp_lambda: 0.5" in saved and "liti_rate: 0.5" in saved and "ema_rate: 0.01" in saved
    policies = json.loads((tmp_path / "run" / "eval" / "results.json").read_text())["policies"]
    assert {"sft", "warp", "liti_0.5", "iter_1", "reinforce_8"} <= set(policies)
    from transformers import AutoModelForCausalLM

    assert type(AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final")).__name__ == "GPT2LMHeadModel"
    assert "WARP − SFT reward" in capsys.readouterr().out


def test_trls_classic_sentiment_setup_rewards_the_positive_logit(classic, tmp_path):
    """configs/trl-sentiment.yaml with local stand-ins: GPT-2 continues review openings, the reward
    is the two-label classifier's POSITIVE output (index 1), and no reward model is trained."""
    from transformers import AutoModelForSequenceClassification

    args = [
        "run", "--config", str(REPO / "configs" / "trl-sentiment.yaml"),
        "--policy", str(classic / "gpt2"), "--reward_funcs", f"{classic / 'distilbert-imdb'}[POSITIVE]",
        "--dataset", str(classic / "imdb-train.parquet"), "--output_dir", str(tmp_path / "run"),
        "--rl_prompts", "40", "--eval_prompts", "10", "--steps", "2", "--batch_size", "4", "--max_new_tokens", "5",
        "--front_points", "2", "--trajectory_points", "1", "--device", "cpu",
    ]  # fmt: skip
    assert main(args) == 0
    out = tmp_path / "run"
    assert not (out / "reward_model").exists()
    rows = [json.loads(line) for line in (out / "eval" / "completions.jsonl").read_text().splitlines()]
    sft = [row for row in rows if row["policy"] == "sft"]
    model = AutoModelForSequenceClassification.from_pretrained(classic / "distilbert-imdb").eval()
    texts = [row["prompt"] + row["completion"] for row in sft]
    with torch.no_grad():
        logits = model(**make_tokenizer()(texts, return_tensors="pt", padding=True)).logits
    rewards = torch.tensor([row["reward"] for row in sft])
    assert torch.allclose(rewards, logits[:, 1], atol=1e-4) and not torch.allclose(rewards, logits[:, 0], atol=1e-2)
    assert "judge" in sft[0]  # VADER, as the config asks
