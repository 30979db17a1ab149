"""WARP's step on one GPU, in bf16: samples/s, peak memory against `warp-rlhf plan`, and mfu.

    PYTHONPATH=src python3 benchmarks/gpu.py                  (one CUDA GPU: under 8 minutes on an H100)
    python benchmarks/gpu.py --toy --device cpu               (the same code at toy size: the test)

Two policies of random weights (the embedded ones are too large to travel): SmolLM2-135M's shape
and a 1B Llama's (tests/shapes/llama-1b), each in four settings, gradient checkpointing off and
on, num_generations 1 and 4 (with G = 4, RLOO's per-prompt baseline, group_loo). Each setting
takes the real `Trainer.step` (generate, reward, anchor, policy forward and backward, AdamW,
EMA) with `precision: bf16` over the same prompts of random tokens, and reports

- samples/s: the batch over the median step's seconds, and the median step's phases;
- peak GPU memory (`torch.cuda.max_memory_allocated` over the steps) against the peak of a run
  that `warp-rlhf plan` gives for the same config from the config alone (`stages.plan`);
- mfu: the median step's model FLOPs (`run.phase_flops`: 2 per weight per token for a forward,
  4 more for a backward; a checkpointed layer's recomputation is not model FLOPs) over its
  seconds, against the card's dense bf16 peak (`DENSE_BF16`, by name) and against the best
  bf16 matrix product measured here;
- TRL's RLOOTrainer on the same model, batch (G = 4) and lengths, with and without gradient
  checkpointing, where TRL can be imported (it is not in a bare CUDA image: carry its wheels).

A guard stops starting new settings after `--budget` seconds, so the script ends in time on a
slower card; what it skipped is listed. Results go to `--out` (JSON) and to stdout as the
markdown table for benchmarks/RESULTS.md, with the GPU's name.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from run import phase_flops

HERE = Path(__file__).resolve().parent
SHAPES = HERE.parent / "tests" / "shapes"
DENSE_BF16 = {"H100 80GB HBM3": 989e12, "H100 SXM": 989e12, "H100 PCIe": 756e12, "H100 NVL": 835e12,
              "H200": 989e12, "A100": 312e12, "L40S": 362e12}  # fmt: skip
"""Dense (no sparsity) bf16 tensor-core FLOP/s of each card, from its datasheet, by a part of its name."""
SMOLLM2 = {"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
           "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152, "tie_word_embeddings": True,
           "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 100000.0}  # fmt: skip
"""SmolLM2-135M's config: the embedded policy's shape."""
TOY = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
       "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 96, "tie_word_embeddings": True,
       "max_position_embeddings": 128}  # fmt: skip


@dataclass(frozen=True)
class Size:
    """Batch and lengths of a benchmark: B sequences, prompts of `prompt` tokens, `new` sampled."""

    batch: int
    prompt: int
    new: int
    steps: int  # measured, after one warm-up step


FULL, SMALL = Size(batch=64, prompt=64, new=128, steps=3), Size(batch=8, prompt=6, new=4, steps=1)
SETTINGS = [(False, 1), (True, 1), (False, 4), (True, 4)]
"""(gradient checkpointing, num_generations) of each measured setting."""
EOS = 2


def model_configs(toy: bool) -> dict[str, dict]:
    """The policies' configs by name: SmolLM2-135M's and the 1B Llama's shapes, or one toy model."""
    if toy:
        return {"toy": TOY}
    return {"smollm2-135m": SMOLLM2, "llama-1b": json.loads((SHAPES / "llama-1b" / "config.json").read_text())}


def word_tokenizer(vocab: int):
    """A tokenizer whose every id is a word `t<id>` (id 0 padding, 2 EOS): random token ids read
    and written as text, as the trainer's sampling and rewards need."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t1"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="t0", unk_token="t1", eos_token=f"t{EOS}")


def prompts(vocab: int, size: Size, count: int = 256) -> list[str]:
    """`count` prompts of `size.prompt` random tokens (none of them special)."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (count, size.prompt), generator=generator)
    return [" ".join(f"t{i}" for i in row.tolist()) for row in ids]


def reward(batch_prompts, completions, completion_ids=None) -> torch.Tensor:
    """The fraction of even token ids in each completion: cheap, and it varies between completions."""
    return torch.tensor([sum(i % 2 == 0 for i in ids) / max(1, len(ids)) for ids in completion_ids])


def warp_config(policy_dir: Path, size: Size, device: str, checkpointing: bool, generations: int):
    from warp_rlhf.config import WarpConfig

    return WarpConfig(
        policy=str(policy_dir), reward_funcs=["benchmarks/gpu.py:reward"], device=device, precision="bf16",
        batch_size=size.batch, num_generations=generations, baseline="group_loo" if generations > 1 else "none",
        gradient_checkpointing=checkpointing, max_new_tokens=size.new, prompt_max_tokens=size.prompt,
        prompt_min_tokens=min(2, size.prompt), learning_rate=1e-5, ema_rate=0.01, beta=0.05, temperature=1.0,
    )  # fmt: skip


def new_policy(model_config: dict, device: str):
    """A Llama of random weights (seeded) on `device`, in fp32: the master weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    fields = {k: v for k, v in model_config.items() if k != "model_type"}
    config = LlamaConfig(**fields | {"pad_token_id": 0, "eos_token_id": EOS, "bos_token_id": None})
    with torch.device(device):
        return LlamaForCausalLM(config)


def measure_warp(model_config: dict, folder: Path, size: Size, device: str, checkpointing: bool, generations: int):
    """Our step: samples/s, the median step's phases, peak memory and the plan's, model FLOPs."""
    from warp_rlhf.algorithm.reinforce import Prompt, RunSpec, Trainer, new_optimizer
    from warp_rlhf.layout import RunFolder
    from warp_rlhf.stages.plan import plan

    policy = new_policy(model_config, device)
    policy.config.save_pretrained(folder)  # the plan reads the shape from the config file alone
    config = warp_config(folder, size, device, checkpointing, generations)
    tokenizer = word_tokenizer(model_config["vocab_size"])
    texts = prompts(model_config["vocab_size"], size)
    trainer = Trainer(config, policy, tokenizer, reward, [Prompt(text) for text in texts])
    optimizer, scheduler = new_optimizer(trainer.policy, config)
    spec = RunSpec(1, 1, RunFolder(folder / "run"), config.ema_rate)
    trainer.start(spec, None)
    _reset_peak(device)
    rows = [trainer.step(spec, step, optimizer, scheduler).as_dict() for step in range(size.steps + 1)][1:]
    median = sorted(rows, key=lambda row: row["seconds"])[len(rows) // 2]
    flops = sum(step_flops(policy, median, size.batch).values())
    return {
        "samples_per_second": size.batch / median["seconds"],
        "seconds_per_step": median["seconds"],
        "phases": {k: v for k, v in median.items() if k.startswith("seconds")},
        "step_seconds": [row["seconds"] for row in rows],
        "tokens": median["tokens"],
        "flops_per_step": flops,
        "peak_memory_bytes": _peak(device),
        "plan_peak_bytes": plan(config).run.peak,
    }


def step_flops(policy, row: dict, rows: int) -> dict:
    """Model FLOPs of the phases of a step of `rows` sequences (`run.phase_flops`), from its metrics
    `row`; the input embedding, a lookup, left out where it is not the output layer."""
    embedding, head = policy.get_input_embeddings().weight, policy.get_output_embeddings().weight
    total = sum(p.numel() for p in policy.parameters()) - (0 if embedding is head else embedding.numel())
    return phase_flops(total, head.numel(), row["tokens"], row["completion_tokens"], 0.0, rows=rows)


def measure_trl(model_config: dict, size: Size, device: str, checkpointing: bool) -> dict:
    """TRL's RLOOTrainer on the same policy, batch (num_generations 4), lengths and reward, with an
    EMA reference synced every step, in bf16: samples/s of the median step, and peak memory."""
    from datasets import Dataset
    from transformers import PrinterCallback, TrainerCallback
    from trl import RLOOConfig, RLOOTrainer

    class StepClock(TrainerCallback):
        def __init__(self):
            self.ends = [time.perf_counter()]

        def on_step_end(self, args, state, control, **kwargs):
            if device == "cuda":
                torch.cuda.synchronize()
            self.ends.append(time.perf_counter())

    def trl_reward(prompts, completions, completion_ids, **kwargs):
        return reward(prompts, completions, completion_ids).tolist()

    clock = StepClock()
    with tempfile.TemporaryDirectory() as out:
        policy = Path(out) / "policy"  # TRL builds its reference model from the policy's folder
        new_policy(model_config, "cpu").save_pretrained(policy)
        args = RLOOConfig(
            output_dir=out, per_device_train_batch_size=size.batch, num_generations=4, max_completion_length=size.new,
            temperature=1.0, top_k=0, top_p=1.0, beta=0.05, learning_rate=1e-5, max_steps=size.steps + 1,
            sync_ref_model=True, ref_model_mixup_alpha=0.01, ref_model_sync_steps=1, bf16=True,
            use_cpu=device == "cpu", gradient_checkpointing=checkpointing, report_to="none", save_strategy="no",
            logging_steps=1, disable_tqdm=True, seed=0,
        )  # fmt: skip
        texts = prompts(model_config["vocab_size"], size)
        trainer = RLOOTrainer(model=str(policy), reward_funcs=trl_reward, args=args,
                              processing_class=word_tokenizer(model_config["vocab_size"]),
                              train_dataset=Dataset.from_dict({"prompt": texts}), callbacks=[clock])  # fmt: skip
        trainer.remove_callback(PrinterCallback)  # its log lines would mix with the table on stdout
        _reset_peak(device)
        trainer.train()
    seconds = statistics.median([b - a for a, b in zip(clock.ends, clock.ends[1:], strict=False)][1:])
    return {"samples_per_second": size.batch / seconds, "seconds_per_step": seconds, "peak_memory_bytes": _peak(device)}


def _reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _peak(device: str) -> int:
    """The most torch allocated on the GPU since `_reset_peak`; on a CPU, the process's peak RSS."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def card(device: str) -> dict:
    """The device's name, its datasheet dense bf16 peak (None: not in `DENSE_BF16`), and the best bf16
    product measured here (a few 8192³ products on a GPU; 512³ on a CPU)."""
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    spec = next((flops for part, flops in DENSE_BF16.items() if part in name), None)
    n = 8192 if device == "cuda" else 512
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    best = 0.0
    for _ in range(5):
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(4):
            a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = max(best, 4 * 2 * n**3 / (time.perf_counter() - started))
    return {"name": name, "dense_bf16_flops": spec, "measured_bf16_flops": best}


def run(toy: bool, device: str, budget: float, with_trl: bool) -> dict:
    """Every (model, setting) in turn, each while the budget lasts; TRL after ours, where importable."""
    started, size = time.monotonic(), SMALL if toy else FULL
    results = {"card": card(device), "size": vars(size), "warp": [], "trl": [], "skipped": []}
    for name, model_config in model_configs(toy).items():
        for checkpointing, generations in SETTINGS:
            case = {"model": name, "gradient_checkpointing": checkpointing, "num_generations": generations}
            if time.monotonic() - started > budget:
                results["skipped"].append(case | {"why": "time budget"})
                continue
            with tempfile.TemporaryDirectory() as folder:
                results["warp"].append(case | measure_warp(model_config, Path(folder), size, device, checkpointing,
                                                           generations))  # fmt: skip
            _free(device)
        for checkpointing in (False, True) if with_trl else ():
            case = {"model": name, "gradient_checkpointing": checkpointing, "num_generations": 4}
            if time.monotonic() - started > budget:
                results["skipped"].append(case | {"why": "time budget", "trainer": "trl"})
                continue
            try:
                results["trl"].append(case | measure_trl(model_config, size, device, checkpointing))
            except ImportError as error:
                results["skipped"].append(case | {"why": f"TRL cannot be imported here: {error}", "trainer": "trl"})
                break
            _free(device)
    results["seconds"] = time.monotonic() - started
    return results


def _free(device: str) -> None:
    import gc

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def markdown(results: dict) -> str:
    """The results as RESULTS.md's GPU section: one row per setting, ours then TRL's."""
    gib, card_, size = 2**30, results["card"], results["size"]
    spec = card_["dense_bf16_flops"]
    against = f"the card's dense bf16 peak ({spec / 1e12:.0f} TFLOP/s)" if spec else "no datasheet peak (DENSE_BF16)"
    lines = [
        f"## On one GPU: {card_['name']}",
        "",
        f"`PYTHONPATH=src python3 benchmarks/gpu.py`: random-weight policies, bf16, batch {size['batch']}, prompts of "
        f"{size['prompt']} tokens, {size['new']} new tokens, the median of {size['steps']} steps after one warm-up; "
        f"mfu against {against}, in brackets against the best bf16 product measured "
        f"({card_['measured_bf16_flops'] / 1e12:.0f} TFLOP/s); peak memory against `warp-rlhf plan`'s, in brackets.",
        "",
        "| trainer | model | checkpointing | G | samples/s | step s | peak GiB (plan) | mfu (measured peak) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in results["warp"]:
        rate = row["flops_per_step"] / row["seconds_per_step"]
        mfu = f"{rate / spec:.3f}" if spec else "–"
        lines.append(
            f"| warp-rlhf | {row['model']} | {'on' if row['gradient_checkpointing'] else 'off'} | "
            f"{row['num_generations']} | {row['samples_per_second']:.1f} | {row['seconds_per_step']:.2f} | "
            f"{row['peak_memory_bytes'] / gib:.1f} ({row['plan_peak_bytes'] / gib:.1f}) | {mfu} "
            f"({rate / card_['measured_bf16_flops']:.3f}) |"
        )
    for row in results["trl"]:
        lines.append(
            f"| TRL RLOOTrainer | {row['model']} | {'on' if row['gradient_checkpointing'] else 'off'} | 4 | "
            f"{row['samples_per_second']:.1f} | {row['seconds_per_step']:.2f} | "
            f"{row['peak_memory_bytes'] / gib:.1f} | – |"
        )
    lines += [f"- skipped: {skip}" for skip in results["skipped"]]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--toy", action="store_true", help="toy sizes: the test's run on a CPU")
    parser.add_argument("--budget", type=float, default=390.0, help="seconds after which no new setting starts")
    parser.add_argument("--no-trl", dest="trl", action="store_false", help="leave TRL's RLOOTrainer out")
    parser.add_argument("--out", type=Path, default=HERE / "results_gpu.json", help="the results as JSON")
    args = parser.parse_args()
    results = run(args.toy, args.device, args.budget, args.trl)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(markdown(results))


if __name__ == "__main__":
    main()
