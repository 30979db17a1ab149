"""`warp-rlhf plan`: shapes from config files alone (nothing loaded or written), parameter counts by
hand, how backends share a device, and the plan against the measured peak RSS of a tiny run."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import SRC
from warp_rlhf.cli import main
from warp_rlhf.config import WarpConfig
from warp_rlhf.stages import plan as planning

SHAPES = Path(__file__).resolve().parents[1] / "shapes"


def _config(policy, tmp_path, **overrides) -> WarpConfig:
    return WarpConfig(policy=str(policy), output_dir=str(tmp_path / "out"), device="cpu", **overrides)


def test_plan_prints_the_memory_from_the_config_alone_and_writes_nothing(
    tiny_policy, tiny_backbone, tmp_path, capsys, monkeypatch
):
    from transformers import PreTrainedModel

    def refuse(*args, **kwargs):
        raise AssertionError("plan loaded weights")

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", refuse)
    out = tmp_path / "X"
    args = ["plan", "--policy", str(tiny_policy), "--reward_model", str(tiny_backbone), "--runs", "4",
            "--batch_size", "8", "--output_dir", str(out), "--backend", "processes", "--device", "cpu"]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    for expected in ("AdamW moments", "θ_ema", "activations without gradient checkpointing", "KV cache",
                     "peak of one run", "backend processes: 2 of the M = 4 runs side by side"):  # fmt: skip
        assert expected in printed, expected
    assert list(tmp_path.iterdir()) == []


def test_parameters_of_the_llama_shapes_and_their_lora_adapters_by_hand():
    one_b = planning.model_shape(planning.policy_config(WarpConfig(policy=str(SHAPES / "llama-1b"))), WarpConfig())
    assert one_b.params == 1_235_814_400 and one_b.output == 128256 * 2048  # tied: counted once
    config = WarpConfig(policy=str(SHAPES / "llama-8b"), lora_r=16)
    eight_b = planning.model_shape(planning.policy_config(config), config)
    # every linear layer but the output: r·(in + out) for q, k, v, o, gate, up, down, in 32 layers
    per_layer = 4096 + 4096 + 2 * (4096 + 1024) + 4096 + 4096 + 3 * (4096 + 14336)
    assert eight_b.trainable == 16 * per_layer * 32 == 41_943_040
    assert eight_b.params == 8_030_261_248 + eight_b.trainable
    assert eight_b.adapted == 32 * (2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336)


def test_the_reward_models_a_run_scores_with(tiny_policy, tiny_backbone, tmp_path):
    trained = planning.reward_params(_config(tiny_policy, tmp_path, reward_model=str(tiny_backbone)))
    assert trained > 0
    ensemble = _config(tiny_policy, tmp_path, reward_model=str(tiny_backbone), reward_models=3, reward_ensemble="ens")
    assert planning.reward_params(ensemble) == 3 * trained  # the mean of three members' scores: three models
    assert planning.reward_params(_config(tiny_policy, tmp_path, reward_funcs=["rewards.py:positive"])) == 0
    classifier = _config(tiny_policy, tmp_path, reward_funcs=[f"{tiny_backbone}[0]", "rewards.py:positive"])
    assert planning.reward_params(classifier) == trained + 32 + 1  # its own head: two outputs, one more row


def test_checkpointing_keeps_less_and_lora_keeps_the_mlp_products(tiny_policy, tmp_path):
    full = _config(tiny_policy, tmp_path)
    lora = _config(tiny_policy, tmp_path, lora_r=4)
    shape = planning.model_shape(planning.policy_config(full), full)
    without, with_ = (planning.activation_bytes(shape, full, "cpu", ckpt) for ckpt in (False, True))
    assert with_ < without
    lora_shape = planning.model_shape(planning.policy_config(lora), lora)
    # LoRA's MLP keeps act(gate) and the product too: 2 more (tokens, intermediate) per layer
    tokens = full.batch_size * (full.prompt_max_tokens + full.max_new_tokens)
    extra = 2 * tokens * shape.intermediate * 4 * shape.layers
    assert planning.activation_bytes(lora_shape, lora, "cpu", False) - without == extra


def test_the_backends_share_a_device_as_they_run(tiny_policy, tmp_path):
    local = planning.plan(_config(tiny_policy, tmp_path, runs=4))
    assert local.placement.runs == 1 and local.placement.driver == 0
    processes = planning.plan(_config(tiny_policy, tmp_path, runs=4, backend="processes"))
    assert processes.placement.runs == _at_once(4) and processes.placement.driver > planning.CPU_RUNTIME
    ray = planning.plan(WarpConfig(policy=str(tiny_policy), runs=4, backend="ray", ray_num_gpus=0.5, device="cuda"))
    assert ray.device == "cuda" and ray.placement.runs == 2  # two runs share each GPU
    assert ray.placement.per_run == ray.run.peak + planning.CUDA_CONTEXT
    assert ray.placement.total == 2 * ray.placement.per_run


def _at_once(runs: int) -> int:
    from warp_rlhf.runners import side_by_side

    return side_by_side(runs)[0]


MEASURE = """
import json, re, sys, threading, time
from pathlib import Path
from warp_rlhf.cpu import keep_freed_memory
keep_freed_memory()  # as a run's process does at its start
peak, running = [0], [True]

def sample():  # the most anonymous resident memory seen, every millisecond
    while running[0]:
        status = open("/proc/self/status").read()
        peak[0] = max(peak[0], int(re.search(r"RssAnon:\\s+(\\d+)", status).group(1)) * 1024)
        time.sleep(0.001)

threading.Thread(target=sample, daemon=True).start()
from tests.helpers import PROMPTS, good_fraction, make_tokenizer
from warp_rlhf.algorithm.reinforce import RunSpec, Trainer
from warp_rlhf.algorithm.run_loop import train_run
from warp_rlhf.config import WarpConfig
from warp_rlhf.layout import RunFolder
from warp_rlhf.stages.models import load_causal_lm
config = WarpConfig(**json.loads(sys.argv[1]))
trainer = Trainer(config, load_causal_lm(config.policy), make_tokenizer(), good_fraction, PROMPTS)
train_run(trainer, RunSpec(1, 1, RunFolder(Path(sys.argv[2])), config.ema_rate), None, 2)
time.sleep(0.01)
running[0] = False
print(peak[0])
"""


@pytest.mark.slow
@pytest.mark.parametrize("lora_r", [0, 4])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_plan_is_within_15_percent_of_a_tiny_runs_measured_peak_memory(
    tiny_policy, tiny_backbone, tmp_path, lora_r, checkpointing
):
    """A run in a fresh process, two steps, as a run's process takes them: its peak anonymous
    resident memory against the plan's peak without the shared libraries' pages (which vary with
    the page cache: at this size, more than the run's own memory)."""
    fields = {"policy": str(tiny_policy), "reward_model": str(tiny_backbone), "batch_size": 8, "device": "cpu",
              "max_new_tokens": 6, "lora_r": lora_r, "gradient_checkpointing": checkpointing}  # fmt: skip
    root = str(SRC.parent)
    env = {"PYTHONPATH": f"{SRC}:{root}", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", MEASURE, json.dumps(fields), str(tmp_path / "run")],
                          capture_output=True, text=True, env=env, cwd=root, check=True)  # fmt: skip
    measured = int(done.stdout.strip().splitlines()[-1])
    planned = planning.plan(WarpConfig(**fields)).run.peak - planning.CPU_LIBRARIES
    assert 0.85 <= planned / measured <= 1.15, (planned, measured)
