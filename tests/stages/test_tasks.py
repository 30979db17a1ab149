"""Any task: prompt datasets (standard and conversational), rewards as TRL's reward_funcs (a Python
function reading a column, a two-label classifier by its POSITIVE output, weights), reward models
from chosen/rejected files, a tokenizer's BOS token, and bad input in one line."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.helpers import VOCAB, cli_error, make_tokenizer
from warp_rlhf.algorithm.reinforce import Prompt, TrainingError
from warp_rlhf.cli import main
from warp_rlhf.errors import ModelError
from warp_rlhf.policy import encode_prompts
from warp_rlhf.stages.prompts import render
from warp_rlhf.stages.rewards import Reward, Rewards, build_reward

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} . {% endfor %}"
    "{% if add_generation_prompt %}assistant : {% endif %}"
)
REWARD_FILE = '''
def wants_topic(prompts, completions, topic, **columns):
    """1 per word of the completion that is the row's topic: it needs the extra column."""
    assert isinstance(topic, list) and len(topic) == len(completions)
    text = [c if isinstance(c, str) else c[0]["content"] for c in completions]
    return [float(t.split().count(word)) for t, word in zip(text, topic)]


def conversational(prompts, completions, **columns):
    assert all(isinstance(p, list) and p[0]["role"] == "user" for p in prompts), prompts
    assert all(c[0]["role"] == "assistant" for c in completions)
    return [0.0] * len(completions)


def too_few(prompts, completions, **columns):
    return [0.0] * (len(completions) - 1)


def not_finite(prompts, completions, **columns):
    return [float("nan")] * len(completions)
'''


@pytest.fixture(scope="module")
def task(tmp_path_factory, tiny_policy, tiny_backbone):
    """A prompt JSONL (standard and conversational), a chat policy, a reward file, a two-label classifier."""
    from transformers import AutoModelForSequenceClassification

    root = tmp_path_factory.mktemp("task")
    words = ["movie", "film", "plot", "story", "scene", "actor"]
    with open(root / "prompts.jsonl", "w") as handle:
        for i in range(60):
            handle.write(json.dumps({"prompt": f"the {words[i % 6]} was", "topic": ["good", "bad"][i % 2]}) + "\n")
    with open(root / "chat.jsonl", "w") as handle:
        for i in range(60):
            messages = [{"role": "user", "content": f"the {words[i % 6]}"}]
            handle.write(json.dumps({"prompt": messages, "topic": ["good", "bad"][i % 2]}) + "\n")
    shutil.copytree(tiny_policy, root / "chat_policy")
    tokenizer = make_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(root / "chat_policy")
    (root / "rewards.py").write_text(REWARD_FILE)
    torch.manual_seed(1)
    classifier = AutoModelForSequenceClassification.from_pretrained(
        tiny_backbone, num_labels=2, id2label={0: "NEGATIVE", 1: "POSITIVE"}, label2id={"NEGATIVE": 0, "POSITIVE": 1}
    )
    classifier.save_pretrained(root / "sentiment")
    make_tokenizer().save_pretrained(root / "sentiment")
    return root


def task_args(task: Path, tiny_policy, tmp_path, *extra: str) -> list[str]:
    return [
        "--policy", str(tiny_policy), "--dataset", str(task / "prompts.jsonl"), "--output_dir", str(tmp_path / "run"),
        "--rl_prompts", "40", "--eval_prompts", "12", "--max_new_tokens", "5", "--iterations", "1", "--runs", "2",
        "--steps", "2", "--batch_size", "4", "--front_points", "2", "--trajectory_points", "1", "--device", "cpu",
        *extra,
    ]  # fmt: skip


def test_a_prompt_file_with_a_function_and_a_classifier_reward_and_weights(task, tiny_policy, tmp_path, monkeypatch):
    monkeypatch.chdir(task)  # reward files are found from the working folder
    rewards = "rewards.py:wants_topic,sentiment[POSITIVE]"
    assert (
        main(["run", *task_args(task, tiny_policy, tmp_path, "--reward_funcs", rewards, "--reward_weights", "1,0.5")])
        == 0
    )
    out = tmp_path / "run"
    assert not (out / "reward_model").exists(), "every reward is given: no reward model is trained"
    splits = json.loads((out / "data" / "splits.json").read_text())
    train, held = {p["text"] for p in splits["rl_prompts"]}, [p["text"] for p in splits["eval_prompts"]]
    assert len(held) == 12 and len(splits["rl_prompts"]) == 40 and splits["kind"] == "prompts"
    assert {p["columns"]["topic"] for p in splits["rl_prompts"]} == {"good", "bad"}
    rows = json.loads((out / "eval" / "policies" / "sft.json").read_text())["samples"]
    topic, positive = rows["rewards"]["wants_topic"], rows["rewards"]["sentiment_positive"]
    assert rows["reward"] == pytest.approx([a + 0.5 * b for a, b in zip(topic, positive, strict=True)], abs=1e-5)
    results = json.loads((out / "eval" / "results.json").read_text())["policies"]
    assert {"reward_wants_topic_mean", "reward_sentiment_positive_mean"} <= set(results["warp"])
    assert "judge_mean" not in results["sft"]  # judge auto: none outside review data
    assert (out / "eval" / "reward_wants_topic_vs_kl.png").exists()
    assert "reward_wants_topic" in (out / "report.md").read_text()
    assert len(train | set(held)) <= 60


def test_conversational_prompts_go_through_the_chat_template(task, tmp_path, monkeypatch):
    monkeypatch.chdir(task)
    args = task_args(task, task / "chat_policy", tmp_path, "--dataset", str(task / "chat.jsonl"))
    assert main(["train", *args, "--reward_funcs", "rewards.py:conversational"]) == 0
    prompt = json.loads((tmp_path / "run" / "data" / "splits.json").read_text())["rl_prompts"][0]
    assert prompt["text"].startswith("user : the ") and prompt["text"].endswith("assistant : ")
    assert prompt["raw"][0]["role"] == "user"


def test_a_two_label_classifier_is_scored_by_the_output_it_names(task):
    from transformers import AutoModelForSequenceClassification

    from warp_rlhf.config import WarpConfig

    prompts, completions = [Prompt("the movie"), Prompt("a film")], [" was good", " was bad"]
    score = build_reward(f"{task / 'sentiment'}[POSITIVE]", WarpConfig(), task, make_tokenizer())
    got = Reward("sentiment[POSITIVE]", 1.0, score)(prompts, completions)
    model = AutoModelForSequenceClassification.from_pretrained(task / "sentiment").eval()
    with torch.no_grad():
        logits = model(
            **make_tokenizer()(["the movie was good", "a film was bad"], return_tensors="pt", padding=True)
        ).logits
    assert torch.allclose(got, logits[:, 1], atol=1e-5) and not torch.allclose(got, logits[:, 0], atol=1e-3)
    assert torch.allclose(
        Reward("by index", 1.0, build_reward(f"{task / 'sentiment'}[1]", WarpConfig(), task, None))(
            prompts, completions
        ),
        got,
    )
    with pytest.raises(
        ModelError, match=r"gives 2 scores per text \(NEGATIVE, POSITIVE\): choose the reward as .*\[POSITIVE\]"
    ):
        build_reward(str(task / "sentiment"), WarpConfig(), task, None)


def test_rewards_add_up_with_their_weights_and_check_what_they_return():
    double = Reward("double", 0.5, lambda prompts, completions, ids=None: [2.0 * len(c) for c in completions])
    one = Reward("one", -1.0, lambda prompts, completions, ids=None: torch.ones(len(completions)))
    rewards = Rewards([double, one])
    total = rewards([Prompt("x"), Prompt("y")], ["ab", "abcd"])
    assert torch.equal(total, torch.tensor([0.5 * 4 - 1, 0.5 * 8 - 1]))
    with pytest.raises(TrainingError, match="reward short returned 1 values for 2 completions"):
        Reward("short", 1.0, lambda p, c, ids=None: [1.0])([Prompt("x"), Prompt("y")], ["a", "b"])
    with pytest.raises(TrainingError, match=r"reward nan returned a value that is not finite \(nan\)"):
        Reward("nan", 1.0, lambda p, c, ids=None: [float("nan")] * 2)([Prompt("x"), Prompt("y")], ["a", "b"])


@pytest.mark.parametrize("explicit", [False, True])
def test_the_reward_model_trains_from_a_chosen_rejected_file(
    task, tiny_policy, tiny_backbone, tmp_path, explicit, capsys
):
    pairs = tmp_path / "pairs.jsonl"
    with open(pairs, "w") as handle:
        for i in range(80):
            row = {"chosen": "the movie was good great", "rejected": "the movie was bad awful"}
            if explicit:  # conversational, with an explicit prompt
                row = {"prompt": [{"role": "user", "content": f"scene {i}"}],
                       "chosen": [{"role": "assistant", "content": "good great"}],
                       "rejected": [{"role": "assistant", "content": "bad awful"}]}  # fmt: skip
            handle.write(json.dumps(row) + "\n")
    policy = task / "chat_policy" if explicit else tiny_policy
    args = task_args(task, policy, tmp_path, "--reward_model", str(tiny_backbone), "--reward_dataset", str(pairs))
    assert (
        main(["reward", *args, "--reward_epochs", "1", "--reward_train_pairs", "60", "--reward_eval_pairs", "8"]) == 0
    )
    splits = json.loads((tmp_path / "run" / "data" / "splits.json").read_text())
    assert len(splits["reward_train"]) == 60 and len(splits["reward_eval"]) == 8
    chosen = splits["reward_train"][0][0]
    if explicit:  # the conversation, rendered by the policy's chat template (the backbone has none)
        assert chosen.startswith("user : scene ") and chosen.endswith("assistant : good great . ")
    else:
        assert chosen == "the movie was good great"
    assert json.loads((tmp_path / "run" / "reward_model" / "metrics.json").read_text())["train_pairs"] == 60


def test_a_tokenizer_with_a_bos_token_gets_it_before_every_prompt_and_once_after_a_template():
    from tokenizers.processors import TemplateProcessing

    tokenizer = make_tokenizer()
    tokenizer.bos_token = "<cls>"  # a tokenizer that puts its BOS token first, like Llama's and Gemma's
    tokenizer._tokenizer.post_processor = TemplateProcessing(single="<cls> $A", special_tokens=[("<cls>", 3)])
    batch = encode_prompts(tokenizer, ["the movie was", "a"])
    first = [row[mask.bool()][0].item() for row, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True)]
    assert first == [VOCAB.index("<cls>")] * 2
    tokenizer.chat_template = "<cls>" + CHAT_TEMPLATE  # a template that writes the BOS token itself
    text = render(tokenizer, [{"role": "user", "content": "hi"}], generation_prompt=True)
    assert not text.startswith("<cls>")
    ids = encode_prompts(tokenizer, [text])["input_ids"][0].tolist()
    assert ids.count(VOCAB.index("<cls>")) == 1 and ids[0] == VOCAB.index("<cls>")
    plain = make_tokenizer()  # no BOS token: prompts as they are
    assert encode_prompts(plain, ["the movie"])["input_ids"][0].tolist() == plain("the movie")["input_ids"]


BAD = [
    ("a missing reward file", ["--reward_funcs", "nowhere.py:f"], "reward function file nowhere.py does not exist"),
    ("a missing function", ["--reward_funcs", "rewards.py:nothing"], "rewards.py has no function 'nothing'"),
    ("too few values", ["--reward_funcs", "rewards.py:too_few"],
     "iter 1 run 1 step 1: reward rewards.py:too_few returned 3 values for 4 completions"),
    ("a NaN reward", ["--reward_funcs", "rewards.py:not_finite"], "returned a value that is not finite (nan)"),
    ("an unknown label", ["--reward_funcs", "sentiment[HAPPY]"],
     "has no output 'HAPPY' (its outputs: NEGATIVE, POSITIVE)"),
    ("no label for two outputs", ["--reward_funcs", "sentiment"], "gives 2 scores per text (NEGATIVE, POSITIVE)"),
    ("a missing prompt column", ["--reward_funcs", "rewards.py:wants_topic", "--prompt_column", "question"],
     "has neither a 'question' column (prompts) nor 'text' and 'label' columns (reviews)"),
    ("weights that do not match", ["--reward_funcs", "rewards.py:wants_topic", "--reward_weights", "1,2"],
     "reward_weights has 2 value(s) for 1 reward(s)"),
    ("prompts without pairs or rewards", [], "holds prompts but no preference pairs to train the reward model on"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "flags", "message"), BAD, ids=[case for case, *_ in BAD])
def test_bad_task_input_is_one_line_exit_2_and_nothing_written(case, flags, message, task, tiny_policy, tiny_backbone,
                                                              tmp_path, capsys, monkeypatch):  # fmt: skip
    monkeypatch.chdir(task)
    args = task_args(task, tiny_policy, tmp_path, "--reward_model", str(tiny_backbone), *flags)
    line = cli_error(["run", *args], capsys)
    assert message in line, line
    assert not (tmp_path / "run").exists()
