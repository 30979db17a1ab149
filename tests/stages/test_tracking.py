"""Tracking and LoRA from the command line: TensorBoard events read back, a missing tracker in one
line, a LoRA run whose final/ loads with from_pretrained and whose adapter is exactly its change."""

import json
import sys

import pytest
import torch

from tests.helpers import TRAIN_FLAGS, cli_error, same_weights, share_reward_model
from warp_rlhf.cli import main


def scalars(folder, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {event.step: event.value for event in events.Scalars(tag)}


def test_tensorboard_holds_every_runs_reward_at_its_steps_and_the_reward_model(tiny_args, tmp_path):
    pytest.importorskip("tensorboard", reason="the [tensorboard] extra, which `make test` installs")
    assert main(["train", *tiny_args, *TRAIN_FLAGS, "--report_to", "tensorboard"]) == 0
    out = tmp_path / "run"
    for run in ("iter_1/run_1", "iter_1/run_2", "iter_2/run_1", "iter_2/run_2"):
        logged = scalars(out / "tensorboard" / run, "reward_mean")
        rows = [json.loads(line) for line in (out / run / "metrics.jsonl").read_text().splitlines()]
        assert logged == pytest.approx({row["step"]: row["reward_mean"] for row in rows}), run
    accuracy = json.loads((out / "reward_model" / "metrics.json").read_text())["eval_pairwise_accuracy"]
    assert scalars(out / "tensorboard" / "reward_model", "eval_pairwise_accuracy") == pytest.approx({0: accuracy})


def test_evaluation_results_are_tracked(tiny_args, tmp_path):
    pytest.importorskip("tensorboard", reason="the [tensorboard] extra, which `make test` installs")
    flags = [*TRAIN_FLAGS, "--iterations", "1", "--front_points", "2", "--trajectory_points", "1"]
    assert main(["run", *tiny_args, *flags, "--report_to", "tensorboard"]) == 0
    out = tmp_path / "run"
    results = json.loads((out / "eval" / "results.json").read_text())["policies"]
    logged = scalars(out / "tensorboard" / "evaluation", "warp/reward_mean")
    assert list(logged.values()) == pytest.approx([results["warp"]["reward_mean"]])


def test_a_training_that_raises_still_finishes_its_tracked_runs(tiny_args, tmp_path, capsys, monkeypatch):
    pytest.importorskip("tensorboard", reason="the [tensorboard] extra, which `make test` installs")
    from warp_rlhf.algorithm.reinforce import Trainer, TrainingError
    from warp_rlhf.stages.tracking import _TensorBoard

    finished = []
    finish = _TensorBoard.finish
    monkeypatch.setattr(_TensorBoard, "finish", lambda self: finished.append(self.writer.get_logdir()) or finish(self))
    step = Trainer.step

    def fail_at_the_second_step(self, spec, index, *args):
        if index == 1:
            raise TrainingError("the loss is not finite")
        return step(self, spec, index, *args)

    monkeypatch.setattr(Trainer, "step", fail_at_the_second_step)
    line = cli_error(["train", *tiny_args, *TRAIN_FLAGS, "--report_to", "tensorboard"], capsys)
    assert "error: the loss is not finite" in line
    assert str(tmp_path / "run" / "tensorboard" / "iter_1" / "run_1") in finished  # it had logged its first step


def test_a_missing_tracker_is_one_line_naming_its_extra(tiny_args, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "trackio", None)  # as if it were not installed
    line = cli_error(["train", *tiny_args, *TRAIN_FLAGS, "--report_to", "tensorboard,trackio"], capsys)
    assert line.endswith("report_to: trackio needs the trackio package: pip install 'warp-rlhf[trackio]'")
    assert not (tmp_path / "run").exists()
    line = cli_error(["train", *tiny_args, "--report_to", "mlflow"], capsys)
    assert "report_to='mlflow' is out of range: must be none, tensorboard, trackio or wandb" in line


def test_a_lora_run_saves_merged_weights_that_load_plainly_and_an_exact_adapter(tiny_args, tmp_path):
    pytest.importorskip("peft", reason="the [lora] extra, which `make test` installs")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    flags = [*TRAIN_FLAGS, "--lora_r", "4", "--lora_alpha", "8", "--learning_rate", "1e-3", "--save_adapter", "true"]
    assert main(["train", *tiny_args, *flags]) == 0
    out = tmp_path / "run"
    final = AutoModelForCausalLM.from_pretrained(out / "final")
    assert not any("lora" in name for name, _ in final.named_parameters())
    slerp = __import__("safetensors.torch", fromlist=["load_file"]).load_file(out / "iter_2" / "slerp.safetensors")
    assert all(torch.equal(final.state_dict()[name], tensor) for name, tensor in slerp.items())
    base = AutoModelForCausalLM.from_pretrained(tiny_args[tiny_args.index("--policy") + 1])
    adapter = json.loads((out / "final" / "adapter" / "adapter_config.json").read_text())
    assert 1 <= max(adapter["rank_pattern"].values()) <= 2 * 2 * 4  # at most I·M·r, though the change rounds in fp32
    merged = PeftModel.from_pretrained(base, out / "final" / "adapter").merge_and_unload()
    for name, tensor in slerp.items():
        assert torch.allclose(merged.state_dict()[name], tensor, atol=1e-6), name
    assert not torch.equal(
        slerp["model.layers.0.self_attn.q_proj.weight"], base.state_dict()["model.layers.0.self_attn.q_proj.weight"]
    )


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["processes", "ray"])
def test_lora_runs_side_by_side_give_the_local_weights(backend, tiny_args, tmp_path):
    if backend == "ray":
        pytest.importorskip("ray", reason="the [ray] extra, which `make test` installs")
    pytest.importorskip("peft", reason="the [lora] extra, which `make test` installs")
    flags = [*TRAIN_FLAGS, "--lora_r", "4", "--iterations", "1", "--learning_rate", "3e-2"]
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # as each run side by side
    try:
        assert main(["train", *tiny_args, *flags, "--output_dir", str(tmp_path / "local")]) == 0
    finally:
        torch.set_num_threads(previous)
    share_reward_model(tmp_path / "local", tmp_path / backend)
    extra = ["--backend", backend, *(["--ray_num_cpus", "1"] if backend == "ray" else [])]
    assert main(["train", *tiny_args, *flags, "--output_dir", str(tmp_path / backend), *extra]) == 0
    for run in ("iter_1/run_1/policy.safetensors", "iter_1/run_2/policy.safetensors", "final/model.safetensors"):
        assert same_weights(tmp_path / "local" / run, tmp_path / backend / run), run
