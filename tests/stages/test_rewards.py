"""Rewards that could be silently wrong or end in a traceback: a scorer whose tokenizer reads no
text, pickled weights, a reward function that raises or is `async def`, and values that are not
one float32 number per completion — each refused in one line naming it, before any work where it
can be."""

import json
import pickle
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from tests.helpers import cli_error, make_tokenizer
from warp_rlhf.algorithm.reinforce import Prompt, TrainingError
from warp_rlhf.cli import main
from warp_rlhf.config import WarpConfig
from warp_rlhf.errors import ModelError
from warp_rlhf.stages.models import load_causal_lm, load_tokenizer, loading
from warp_rlhf.stages.rewards import Reward, RewardError, build_reward

FUNCTIONS = '''
import asyncio


def brevity(prompts, completions, **columns):
    raise ValueError("completions must be short\\nsecond line")


def quiet(prompts, completions, **columns):
    raise KeyError


async def async_length(prompts, completions, **columns):
    await asyncio.sleep(0)
    return [float(len(c)) for c in completions]


async def async_fails(prompts, completions, **columns):
    await asyncio.sleep(0)
    raise RuntimeError("the judge service is down")


def huge(prompts, completions, **columns):
    return [1e39] * len(completions)
'''
PROMPTS, COMPLETIONS = [Prompt("the movie"), Prompt("a film")], [" was good", " was bad"]


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_policy, tiny_backbone) -> Path:
    """Folders that are each missing something: a classifier and a backbone without tokenizer files,
    a policy and a classifier whose weights are only a pickle (`pytorch_model.bin`); a prompt file
    and the reward functions."""
    from transformers import AutoModel, AutoModelForSequenceClassification

    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    classifier = AutoModelForSequenceClassification.from_pretrained(tiny_backbone, num_labels=1)
    classifier.save_pretrained(root / "no_tokenizer")  # config.json and model.safetensors only
    AutoModel.from_pretrained(tiny_backbone).save_pretrained(root / "backbone_no_tokenizer")
    for name, source in (("policy_bin", tiny_policy), ("classifier_bin", root / "no_tokenizer")):
        shutil.copytree(source, root / name)
        make_tokenizer().save_pretrained(root / name)
        weights = root / name / "model.safetensors"
        from safetensors.torch import load_file

        torch.save(load_file(weights), root / name / "pytorch_model.bin")
        weights.unlink()
    with open(root / "prompts.jsonl", "w") as handle:
        handle.writelines(json.dumps({"prompt": f"the {w} was"}) + "\n" for w in ["movie", "film", "plot"] * 20)
    (root / "functions.py").write_text(FUNCTIONS)
    return root


def run_args(models: Path, policy, tmp_path, *extra: str) -> list[str]:
    return [
        "--policy", str(policy), "--dataset", str(models / "prompts.jsonl"), "--output_dir", str(tmp_path / "run"),
        "--rl_prompts", "20", "--eval_prompts", "8", "--max_new_tokens", "4", "--iterations", "1", "--runs", "1",
        "--steps", "1", "--batch_size", "4", "--front_points", "2", "--trajectory_points", "1", "--device", "cpu",
        *extra,
    ]  # fmt: skip


MISSING = [
    ("a reward model without its tokenizer", lambda m: ["--reward_funcs", str(m / "no_tokenizer")],
     "no_tokenizer knows no word of 'The movie was good, and the story is a great one.'"),
    ("a judge model without its tokenizer",
     lambda m: ["--reward_funcs", "functions.py:huge", "--judge", str(m / "no_tokenizer")],
     "no_tokenizer knows no word"),
    ("a reward backbone without its tokenizer", lambda m: ["--reward_model", str(m / "backbone_no_tokenizer"),
                                                           "--dataset", str(m.parent / "reviews.csv")],
     "backbone_no_tokenizer knows no word"),
    ("a reward model with pickled weights", lambda m: ["--reward_funcs", str(m / "classifier_bin")],
     "classifier_bin has no safetensors weights (model.safetensors) in its folder (only pytorch_model.bin)"),
    ("a policy with pickled weights",
     lambda m: ["--policy", str(m / "policy_bin"), "--reward_funcs", "functions.py:huge"],
     "policy_bin has no safetensors weights"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "flags", "message"), MISSING, ids=[case for case, *_ in MISSING])
def test_a_model_missing_its_tokenizer_or_safetensors_is_one_line_before_any_work(
    case, flags, message, models, tiny_policy, reviews_csv, tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(models)
    shutil.copy(reviews_csv, models.parent / "reviews.csv")
    line = cli_error(["run", *run_args(models, tiny_policy, tmp_path), *flags(models)], capsys)
    assert message in line, line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("architecture", ["gpt2", "roberta", "bert", "t5"])
def test_a_tokenizer_built_from_a_bare_model_config_is_refused(architecture, tmp_path):
    """`AutoTokenizer` builds an empty tokenizer from a folder holding only config.json: BERT's reads
    every word as [UNK], GPT-2's and RoBERTa's read nothing, T5's only word boundaries."""
    from transformers import AutoConfig

    AutoConfig.for_model(architecture).save_pretrained(tmp_path)
    with pytest.raises(ModelError, match="knows no word of .*tokenizer.save_pretrained") as error:
        load_tokenizer(str(tmp_path))
    assert "\n" not in str(error.value)


def test_pickled_weights_are_never_loaded_and_the_hubs_refusal_says_how_to_convert(models, tiny_policy):
    with pytest.raises(ModelError, match=r"policy_bin has no safetensors weights .*model.save_pretrained\(folder\)"):
        load_causal_lm(str(models / "policy_bin"))
    with pytest.raises(ModelError, match="reward .*classifier_bin has no safetensors weights"):
        build_reward(str(models / "classifier_bin"), WarpConfig(), models, make_tokenizer())
    hub = OSError(
        "org/model does not appear to have a file named model.safetensors or model.safetensors.index.json "
        "and thus cannot be loaded with `safetensors`. Please do not set `use_safetensors=True`."
    )  # what transformers says of a hub repository without safetensors weights
    refused = pytest.raises(ModelError, match="reward org/model has no safetensors weights .* on the hub, and")
    with refused, loading("org/model", "reward"):
        raise hub
    assert load_causal_lm(str(tiny_policy)) is not None  # safetensors folders load as before


def function_reward(models: Path, name: str) -> Reward:
    spec = f"{models / 'functions.py'}:{name}"
    return Reward(spec, 1.0, build_reward(spec, WarpConfig(), models, make_tokenizer()))


@pytest.mark.parametrize(
    ("name", "message"),
    [("brevity", "functions.py:brevity raised ValueError: completions must be short"),
     ("quiet", "functions.py:quiet raised KeyError"),
     ("async_fails", "functions.py:async_fails raised RuntimeError: the judge service is down")],
)  # fmt: skip
def test_a_reward_function_that_raises_is_one_line_that_survives_pickling(name, message, models):
    with pytest.raises(RewardError, match=message) as raised:
        function_reward(models, name)(PROMPTS, COMPLETIONS)
    error = raised.value
    assert isinstance(error, TrainingError) and "\n" not in str(error) and error.__suppress_context__
    relayed = pickle.loads(pickle.dumps(error))
    assert type(relayed) is RewardError and str(relayed) == str(error)


def test_a_raising_reward_function_is_one_line_on_the_command_line(models, tiny_policy, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(models)
    with pytest.raises(SystemExit) as stop:
        main(["train", *run_args(models, tiny_policy, tmp_path, "--reward_funcs", "functions.py:brevity")])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "Traceback" not in err
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert errors == [
        "warp-rlhf: error: iter 1 run 1 step 1: reward function functions.py:brevity raised ValueError: "
        "completions must be short"
    ], err


def test_an_async_reward_function_is_awaited(models):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "coroutine ... was never awaited" would fail here
        values = function_reward(models, "async_length")(PROMPTS, COMPLETIONS)
    assert values.tolist() == [float(len(c)) for c in COMPLETIONS]


def reward_returning(values) -> Reward:
    return Reward("rewards.py:f", 1.0, lambda prompts, completions, ids=None: values)


RETURNS = {
    "a Python float beyond float32": (
        [1e39, 0.0], "returned 1e+39 for completion 1, which overflows float32 (largest 3.403e+38): scale it down"
    ),
    "a negative one": ([0.0, -1e300], "returned -1e+300 for completion 2, which overflows float32"),
    "an int beyond float32": ([10**39, 0], "returned 1e+39 for completion 1, which overflows float32"),
    "NaN": ([0.0, float("nan")], "returned a value that is not finite (nan) for completion 2"),
    "an infinite tensor": (torch.tensor([float("-inf"), 0.0]), "returned a value that is not finite (-inf) for"),
    "a text in the list": (["0.5", 1.0], "returned '0.5' for completion 1, not a number"),
    "None": (None, "returned None (NoneType), not a list of numbers"),
    "a dict": ({"a": 1.0}, "returned {'a': 1.0} (dict), not a list of numbers"),
    "ragged lists": ([[1.0, 2.0], [3.0]], "returned [[1.0, 2.0], [3.0]] (list), not a list of numbers"),
    "too few values": ([1.0], "returned 1 values for 2 completions"),
}


@pytest.mark.parametrize(("values", "message"), RETURNS.values(), ids=RETURNS.keys())
def test_values_that_are_not_one_float32_number_per_completion_are_one_line_naming_the_reward(values, message):
    reward = Reward("rewards.py:f", 1.0, lambda prompts, completions, ids=None: values)
    with pytest.raises(RewardError) as error:
        reward(PROMPTS, COMPLETIONS)
    assert str(error.value).startswith(f"reward rewards.py:f {message}") and "\n" not in str(error.value)


def test_none_means_the_reward_does_not_apply_and_is_left_out_of_the_sum():
    """TRL's rule: a None in a function's output leaves that reward out of the weighted sum there."""
    from warp_rlhf.stages.rewards import Rewards

    some = Reward("rewards.py:some", 2.0, lambda prompts, completions, ids=None: [1.0, None, 3.0])
    every = Reward("rewards.py:every", 1.0, lambda prompts, completions, ids=None: [10.0, 20.0, 30.0])
    rewards = Rewards([some, every])
    each = rewards.each([Prompt("x")] * 3, ["a", "b", "c"])
    assert torch.isnan(each["some"][1]) and each["some"][[0, 2]].tolist() == [1.0, 3.0]
    assert rewards.total(each).tolist() == [12.0, 20.0, 36.0]
    with pytest.raises(RewardError, match="returned 2 values for 3 completions"):
        Reward("rewards.py:f", 1.0, lambda prompts, completions, ids=None: [1.0, None])([Prompt("x")] * 3, list("abc"))
