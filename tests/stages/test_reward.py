import json
import random

import pytest
import torch

from tests.helpers import synthetic_review
from warp_rlhf.cli import main
from warp_rlhf.config import WarpConfig
from warp_rlhf.stages.reward import RewardModel, judge_scores, pairwise_accuracy, train_reward_model


def separable_pairs(n: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    return [(synthetic_review(rng, True, 8), synthetic_review(rng, False, 8)) for _ in range(n)]


def test_bradley_terry_training_beats_chance_on_a_separable_set(tiny_backbone, tmp_path):
    config = WarpConfig(reward_epochs=3, reward_batch_size=16, reward_learning_rate=3e-3, seed=0)
    test_pairs = separable_pairs(100, seed=2)
    metrics = train_reward_model(config, str(tiny_backbone), separable_pairs(240, 1), test_pairs, tmp_path / "rm")
    assert metrics["eval_pairwise_accuracy"] >= 0.9
    reward = RewardModel.from_pretrained(tmp_path / "rm")  # from_pretrained-loadable output
    assert abs(pairwise_accuracy(reward, test_pairs) - metrics["eval_pairwise_accuracy"]) < 1e-6
    assert json.loads((tmp_path / "rm" / "metrics.json").read_text())["train_pairs"] == 240


def test_pairwise_accuracy_counts_strict_wins(tiny_backbone):
    from transformers import AutoModelForSequenceClassification

    from tests.helpers import make_tokenizer

    model = AutoModelForSequenceClassification.from_pretrained(tiny_backbone, num_labels=1)
    reward = RewardModel(model, make_tokenizer())
    texts = ["good movie", "bad movie", "the plot"]
    scores = reward.score(texts)
    assert scores.shape == (3,) and scores.dtype == torch.float32
    pairs = [(texts[0], texts[1]), (texts[1], texts[2]), (texts[2], texts[2])]
    expected = ((scores[0] > scores[1]).float() + (scores[1] > scores[2]).float()) / 3
    assert abs(pairwise_accuracy(reward, pairs) - expected.item()) < 1e-6


def test_judge_scores_sentiment():
    positive, negative = judge_scores(["A wonderful, moving film. I loved it.", "Awful and boring. I hated it."])
    assert positive > 0.5 and negative < -0.5


def test_reward_command_writes_model_metrics_and_config(tiny_args, tmp_path, capsys):
    args = tiny_args + ["--reward_epochs", "2", "--reward_learning_rate", "3e-3"]
    assert main(["reward", *args]) == 0
    out = tmp_path / "run"
    assert (out / "config.yaml").exists() and (out / "data" / "splits.json").exists()
    metrics = json.loads((out / "reward_model" / "metrics.json").read_text())
    assert metrics["eval_pairs"] == 40 and metrics["eval_pairwise_accuracy"] > 0.7
    assert metrics["seed"] == 0 and metrics["swapped_pairs"] == 0 and "members" not in metrics
    assert not (out / "reward_members").exists()  # one model: no members beside it
    assert "held-out pairwise accuracy" in capsys.readouterr().out
    assert main(["reward", *args]) == 0  # a second call reuses the finished model
    assert "(reused)" in capsys.readouterr().out


def test_a_setting_of_the_finished_reward_model_is_refused_and_training_only_fields_are_not(tiny_args, capsys):
    assert main(["reward", *tiny_args, "--reward_epochs", "0.1"]) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        main(["reward", *tiny_args, "--reward_epochs", "0.2"])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [err[-1]] and "reward_epochs: 0.1 → 0.2 would not match the reward model (reward_model/)" in err[-1]
    assert main(["reward", *tiny_args, "--reward_epochs", "0.1", "--learning_rate", "1e-4", "--steps", "7"]) == 0


def test_texts_longer_than_the_backbone_positions_are_truncated_to_them(tiny_backbone):
    from transformers import AutoModelForSequenceClassification

    from tests.helpers import make_tokenizer

    model = AutoModelForSequenceClassification.from_pretrained(tiny_backbone, num_labels=1)
    reward = RewardModel(model, make_tokenizer())  # the tokenizer sets no length limit; the model has 128
    assert reward.max_length == 128
    long, cut = " ".join(["good"] * 400), " ".join(["good"] * 126)  # 126 words + [CLS]-free tokenizer specials
    scores = reward.score([long, cut])
    assert torch.isfinite(scores).all()
