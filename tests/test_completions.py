"""`log_completions`: a table of prompts, completions and each reward every `logging_steps` steps of
a run (and its last) and at each evaluation, in the run's completions/ and in the trackers; it
draws nothing, so the trained weights are bitwise those of a run without it."""

import json

import pytest

from tests.helpers import PROMPTS, good_fraction, make_tokenizer, same_weights, tiny_config
from warp_rlhf import WarpConfig, WarpTrainer
from warp_rlhf.algorithm.reinforce import RunSpec, Trainer
from warp_rlhf.algorithm.run_loop import train_run
from warp_rlhf.layout import RunFolder
from warp_rlhf.stages.models import load_causal_lm

WORDS = ["the movie", "a film", "the plot was", "it is", "the actor and", "a story", "the scene", "it was"]
FLAGS = dict(iterations=1, runs=2, steps=3, batch_size=4, max_new_tokens=4, learning_rate=1e-3, front_points=2,
             rl_prompts=12, eval_prompts=4, device="cpu", checkpoint_every=1)  # fmt: skip


def lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


class Hook:
    """A step hook with a tracker's `completions`: what the run loop hands it."""

    def __init__(self):
        self.tables = {}

    def __call__(self, spec, metrics):
        pass

    def completions(self, spec, step, rows):
        self.tables[step] = rows


def run(tiny_policy, folder: RunFolder, hook=None, **settings) -> None:
    config = tiny_config(folder.path.parent, checkpoint_every=2, **settings)
    trainer = Trainer(config, load_causal_lm(str(tiny_policy)), make_tokenizer(), good_fraction, PROMPTS, hook)
    train_run(trainer, RunSpec(1, 1, folder, 0.1), None, 5)


def test_a_run_logs_every_logging_steps_and_its_last_and_draws_nothing(tiny_policy, tmp_path):
    folder, hook = RunFolder(tmp_path / "logged"), Hook()
    for step in (4, 7):  # tables of an earlier attempt made with other settings
        folder.completions(step).parent.mkdir(parents=True, exist_ok=True)
        folder.completions(step).write_text("stale\n")
    run(tiny_policy, folder, hook, log_completions=True, logging_steps=2)
    assert sorted(folder.completion_tables()) == [2, 4, 5]
    metrics = lines(folder.metrics)
    for step in (2, 4, 5):
        rows = lines(folder.completions(step))
        assert rows == hook.tables[step]
        assert [set(row) for row in rows] == [{"step", "prompt", "completion", "reward"}] * 4
        assert {row["step"] for row in rows} == {step} and all(row["prompt"] in WORDS for row in rows)
        scores = good_fraction(None, [row["completion"] for row in rows]).tolist()
        assert [row["reward"] for row in rows] == pytest.approx(scores)
        assert sum(scores) / 4 == pytest.approx(metrics[step - 1]["reward_mean"])

    run(tiny_policy, RunFolder(tmp_path / "plain"))  # log_completions: false, the default
    assert same_weights(folder.policy, RunFolder(tmp_path / "plain").policy)
    assert not RunFolder(tmp_path / "plain").completion_tables()


def text_summaries(folder, tag: str) -> dict[int, str]:
    """TensorBoard's text summaries of `tag`, by step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    events = EventAccumulator(str(folder), size_guidance={"tensors": 0})
    events.Reload()
    return {
        event.step: tensor_util.make_ndarray(event.tensor_proto).item().decode()
        for event in events.Tensors(f"{tag}/text_summary")
    }


def test_tables_of_each_reward_go_to_tensorboard_in_training_and_evaluation(tiny_policy, tmp_path):
    pytest.importorskip("tensorboard", reason="the [tensorboard] extra, which `make test` installs")
    from datasets import Dataset

    def brevity(completions, **kwargs):
        return [1.0 - len(c) / 40 for c in completions]

    def good(completions, **kwargs):
        return [float(c.split().count("good")) for c in completions]

    out = tmp_path / "out"
    args = WarpConfig(output_dir=str(out), log_completions=True, logging_steps=2, report_to=["tensorboard"], **FLAGS)
    trainer = WarpTrainer(str(tiny_policy), [brevity, good], args=args, train_dataset=Dataset.from_list(
        [{"prompt": text} for text in WORDS * 2]))  # fmt: skip
    trainer.train()
    run_2 = RunFolder(out / "iter_1" / "run_2")
    assert sorted(run_2.completion_tables()) == [2, 3]
    rows = lines(run_2.completions(3))
    assert list(rows[0]) == ["step", "prompt", "completion", "reward", "reward_brevity", "reward_good"]
    for row in rows:
        assert row["reward_brevity"] == pytest.approx(1.0 - len(row["completion"]) / 40)
        assert row["reward"] == pytest.approx(row["reward_brevity"] + row["reward_good"])
    tables = text_summaries(out / "tensorboard" / "iter_1" / "run_2", "completions")
    assert sorted(tables) == [2, 3]
    assert tables[3].splitlines()[0] == "| step | prompt | completion | reward | reward_brevity | reward_good |"
    assert len(tables[3].splitlines()) == 2 + len(rows)
    assert f"| 3 | {rows[0]['prompt']} | {rows[0]['completion']} | {rows[0]['reward']:.4g} |" in tables[3]

    trainer.evaluate()
    evaluated = lines(out / "eval" / "completions.jsonl")
    for policy in ("sft", "warp"):
        (table,) = text_summaries(out / "tensorboard" / "evaluation", f"completions/{policy}").values()
        assert table.splitlines()[0] == "| prompt | completion | reward | reward_brevity | reward_good |"
        assert len(table.splitlines()) == 2 + sum(row["policy"] == policy for row in evaluated)
