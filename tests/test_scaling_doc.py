"""docs/scaling.md's table of one run per GPU is what `warp-rlhf plan` says for each policy shape,
training and length: recomputed here from the config files in tests/shapes."""

from pathlib import Path

from warp_rlhf.config import WarpConfig
from warp_rlhf.stages.plan import GIB, plan

ROOT = Path(__file__).resolve().parents[1]
H100 = 81559 * 2**20
"""An 80 GB H100's memory as the driver reports it."""
POLICIES = {"SmolLM2-135M": "embedded", "Llama 1B": "tests/shapes/llama-1b", "Llama 8B": "tests/shapes/llama-8b"}
LENGTHS = {
    "B 16, 8 + 24 tokens": {"batch_size": 16},
    "B 64 in 4 micro-batches, 256 + 256 tokens": {"batch_size": 64, "grad_accumulation_steps": 4,
                                                  "prompt_max_tokens": 256, "max_new_tokens": 256},
}  # fmt: skip


def scaling_table() -> str:
    """One row per policy and training: each length's device total (`placement`) and its peak phase."""
    rows = [f"| policy | training | {' | '.join(LENGTHS)} | one 80 GB GPU per run |", "|---|---|---|---|---|"]
    for name, policy in POLICIES.items():
        for lora_r in (0, 16):
            plans = [plan(WarpConfig(policy=str(ROOT / policy) if policy != "embedded" else policy, device="cuda",
                                     precision="bf16", lora_r=lora_r, backend="ray", ray_num_gpus=1, **lengths))
                     for lengths in LENGTHS.values()]  # fmt: skip
            cells = [f"{p.placement.total / GIB:.1f} GiB ({p.run.peak_phase})" for p in plans]
            fits = "fits" if all(p.placement.total <= H100 for p in plans) else "does not fit"
            training = f"LoRA r = {lora_r}" if lora_r else "full"
            rows.append(f"| {name} | {training} | {' | '.join(cells)} | {fits} |")
    return "\n".join(rows)


def test_the_scaling_table_is_the_plans():
    text = (ROOT / "docs" / "scaling.md").read_text()
    table = text.split("tests/test_scaling_doc.py recomputes it with warp-rlhf plan -->\n")[1].split("\n<!--")[0]
    assert table == scaling_table()
