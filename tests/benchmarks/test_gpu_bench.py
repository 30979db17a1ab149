"""benchmarks/gpu.py, the GPU benchmark, run as its command runs on a GPU but on the CPU at toy
size: every setting of our step and TRL's measured, the plan beside each peak, the table printed."""

import json
import subprocess
import sys

import pytest

from tests.benchmarks import BENCHMARKS
from tests.helpers import SRC


@pytest.mark.slow
def test_the_gpu_benchmark_runs_every_setting_at_toy_size_on_a_cpu(tmp_path):
    out = tmp_path / "results.json"
    env = {"PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, str(BENCHMARKS / "gpu.py"), "--toy", "--device", "cpu", "--out", str(out)],
                          capture_output=True, text=True, env=env, cwd=SRC.parent, check=True)  # fmt: skip
    results = json.loads(out.read_text())
    settings = {(row["gradient_checkpointing"], row["num_generations"]) for row in results["warp"]}
    assert settings == {(False, 1), (True, 1), (False, 4), (True, 4)} and not results["skipped"]
    for row in results["warp"]:
        assert row["samples_per_second"] > 0 and row["flops_per_step"] > 0
        assert row["peak_memory_bytes"] > 0 and row["plan_peak_bytes"] > 0
        assert set(row["phases"]) >= {"seconds_generate", "seconds_policy", "seconds_ema"}
    assert [row["gradient_checkpointing"] for row in results["trl"]] == [False, True]
    assert "| warp-rlhf | toy | on | 4 |" in done.stdout and "| TRL RLOOTrainer | toy | off | 4 |" in done.stdout
