"""One command, one run: our WARP step against TRL's RLOOTrainer and against the hardware.

    .venv/bin/python benchmarks/run.py            (or: make bench)

On the embedded SmolLM2-135M policy, batch 16, prompts of at most 16 tokens, 24 new tokens:
- our RL step, as WARP takes it with `backend: processes` (what `make demo` uses): the M = 2
  runs of an iteration side by side, each in its own process on its share of the cores
  (`runners.side_by_side`: one core each on 2 cores): samples/s of both together and the
  split of each run's step (generate, reward, anchor, policy, optimizer, ema);
- TRL RLOOTrainer, same model, batch, lengths and reward, num_generations = 2, reference model
  synced as an EMA every step, two runs side by side the same way: samples/s, and the ratio;
- model-FLOPs utilisation of both runs' steps together against the fp32 matmul peak measured in
  this run (the best of three measurements: before, between and after the trainers): the median
  over the measured steps (`utilisation`);
- for reference, one run alone on all the cores (`backend: local`): its step, its mfu, and that
  mfu had each phase taken only its matrix products, timed alone at the step's shapes;
- SLERP merge of M = 2 policies against one torch.add pass over the same tensors;
- peak resident memory of the training processes against their lower bound (policy + grads +
  Adam states + anchor + init + reward model bytes, per process);
- one run alone with gradient checkpointing: its peak RSS and step time against the same run
  without it;
- `warp-rlhf plan`'s peak of a run (`stages.plan`, from the config alone) against the measured
  peak RSS of each run alone: full, LoRA, gradient checkpointing.
Each measurement runs in its own processes (one measurement at a time). The figures go to
benchmarks/results.json, and benchmarks/RESULTS.md is rendered from them through
benchmarks/RESULTS.template.md (`results_markdown`). Step times are the median of the measured
steps (`--steps`, after warm-up), for us and for TRL alike: on a shared host a median is not
moved by one step that a neighbour slowed down. Runs side by side warm up for two steps and take
one more after the measured ones (`_steps_taken`), so that every measured step runs beside the
other runs' measured steps: a process's first step, which touches all of its memory for the
first time (a page fault per page), could otherwise overlap another run's first measured step.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from string import Template

from warp_rlhf.runners import side_by_side

HERE = Path(__file__).resolve().parent
BATCH, NEW_TOKENS, MAX_PROMPT_TOKENS, MU, BETA, LR = 16, 24, 16, 0.01, 0.1, 1e-5
RUNS = 2
"""M, the runs of a WARP iteration that step side by side."""


PROMPTS = "WARP_BENCH_PROMPTS"
"""The environment variable naming the JSON file of RL prompts that the parent wrote for its
children (`write_prompts`): the measured processes, like `backend: processes`' run processes,
get their prompts handed over and never import `datasets` (nor the pandas and pyarrow it
imports: resident memory that a WARP run process does not have)."""

CONFIG = "WARP_BENCH_CONFIG"
"""The environment variable holding a JSON object of config fields that replace the benchmark's
(`_config`), such as another `policy`, `reward_model` and `dataset`: the tests measure tiny
models this way. Unset, the benchmark measures the embedded SmolLM2, MiniLM and IMDB reviews."""

TEMPLATE = HERE / "RESULTS.template.md"
"""RESULTS.md's text, with a `${field}` for each figure (`results_fields`)."""

TARGETS = ("ratio_vs_trl", "mfu", "merge_vs_add", "rss_vs_bound")
"""The figures that have a target (RESULTS.md's first table)."""

OUR_STEP = ("ours", "lora", "checkpointing")
"""The measurements of our training step: their processes set the allocator as a WARP run's does."""


def _config(lora_r: int = 0, checkpointing: bool = False):
    from warp_rlhf.config import WarpConfig

    fields = dict(
        batch_size=BATCH, max_new_tokens=NEW_TOKENS, ema_rate=MU, beta=BETA, learning_rate=LR, device="cpu",
        prompt_min_tokens=4, prompt_max_tokens=MAX_PROMPT_TOKENS, reward_train_pairs=10, reward_eval_pairs=10,
        rl_prompts=256, eval_prompts=10, lora_r=lora_r, gradient_checkpointing=checkpointing,
    )  # fmt: skip
    return WarpConfig(**fields | json.loads(os.environ.get(CONFIG, "{}")))


LORA_R = 8
"""The adapters' rank when LoRA is measured (`measure_lora`): every linear layer but the output."""


def write_prompts(path: Path) -> None:
    """The embedded RL prompts, as the pipeline splits them, into a JSON file."""
    from warp_rlhf.stages import assets
    from warp_rlhf.stages.data import load_reviews, split_reviews
    from warp_rlhf.stages.models import load_tokenizer

    config = _config()
    tokenizer = load_tokenizer(assets.resolve_policy(config), padding_side="left")
    path.write_text(json.dumps([p.text for p in split_reviews(load_reviews(config), config, tokenizer).rl_prompts]))


def _embedded():
    import torch

    from warp_rlhf.stages import assets
    from warp_rlhf.stages.models import load_causal_lm, load_tokenizer
    from warp_rlhf.stages.reward import RewardModel

    config = _config()
    policy_path = assets.resolve_policy(config)
    tokenizer = load_tokenizer(policy_path, padding_side="left")
    prompts = json.loads(Path(os.environ[PROMPTS]).read_text())
    from transformers import AutoModelForSequenceClassification

    backbone = assets.resolve_backbone(config)
    torch.manual_seed(0)
    reward_model = RewardModel(
        AutoModelForSequenceClassification.from_pretrained(backbone, num_labels=1), load_tokenizer(backbone)
    )
    return config, policy_path, tokenizer, prompts, reward_model, load_causal_lm


def phase_flops(
    n_params: int, n_output: int, tokens: float, completion_tokens: float, reward: float, rows: int = BATCH
) -> dict:
    """Model FLOPs of each phase of one step of `rows` sequences: 2 per weight per token for a
    forward, 4 more for a backward.

    The output layer (`n_output` weights, tied to the input embedding, whose lookup costs no
    FLOPs) runs only where a completion token is predicted; the rest of the model on every
    real token (padding excluded). Generation feeds every token but the last of each row
    (prefill + decode); the policy's training forward + backward and the anchor's forward see
    the whole sequence. `reward` is the reward model's forward, counted the same way by the
    caller. Attention's own products (QKᵀ, AV: under 1% at these lengths) are left out.
    """
    body = n_params - n_output
    forward = 2 * (body * tokens + n_output * completion_tokens)
    generation = 2 * (body * (tokens - rows) + n_output * completion_tokens)
    return {"generate": generation, "reward": reward, "anchor": forward, "policy": 3 * forward}


def _forward_flops(model, tokens: int) -> float:
    """2 FLOPs per weight per token, the input embedding (a lookup) left out."""
    body = sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()
    return 2.0 * body * tokens


def _steps_taken(steps: int, run: int | None) -> tuple[int, int]:
    """(warm-up steps, steps taken) for `steps` measured ones: alone, one warm-up step; beside
    other runs, two, and one more after the measured ones (module docstring)."""
    return (1, steps + 1) if run is None else (2, steps + 3)


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure_ours(steps: int, run: int | None = None, lora_r: int = 0, checkpointing: bool = False) -> dict:
    """Our Trainer.step on SmolLM2: the median step (its seconds per phase and FLOPs), and peak RSS.
    `run` m: WARP's run m of the runs side by side (its own seeds); None: one run alone, whose
    matrix products are then also timed alone (`product_seconds`). `lora_r`: LoRA adapters of that
    rank train instead of every weight; `checkpointing`: with gradient checkpointing. Its process
    has set the allocator first (`_start`)."""
    from warp_rlhf.algorithm.reinforce import Prompt, RunSpec, Trainer
    from warp_rlhf.algorithm.run_loop import train_run
    from warp_rlhf.layout import RunFolder

    _, policy_path, tokenizer, texts, reward_model, load_causal_lm = _embedded()
    config, prompts = _config(lora_r, checkpointing), [Prompt(text) for text in texts]
    policy = load_causal_lm(policy_path)

    reward_tokens = []  # real (unpadded) tokens the reward model reads, per step

    def reward(batch_prompts, completions, completion_ids=None):
        texts = [p.text + c for p, c in zip(batch_prompts, completions, strict=True)]
        encoded = reward_model.tokenizer(texts, truncation=True, max_length=reward_model.max_length)
        reward_tokens.append(sum(len(ids) for ids in encoded["input_ids"]))
        return reward_model.score(texts)

    trainer = Trainer(config, policy, tokenizer, reward, prompts)
    with tempfile.TemporaryDirectory() as folder:
        warmup, taken = _steps_taken(steps, run)
        spec = RunSpec(1, run or 1, RunFolder(Path(folder)), MU)
        train_run(trainer, spec, None, taken)  # the real code path, checkpoints included
        rows = [json.loads(line) for line in (Path(folder) / "metrics.jsonl").read_text().splitlines()]
    n_params = sum(p.numel() for p in policy.parameters())
    output_weights = policy.get_output_embeddings().weight.numel()
    for row, tokens in zip(rows, reward_tokens, strict=True):
        row["flops"] = phase_flops(n_params, output_weights, row["tokens"], row["completion_tokens"],
                                   _forward_flops(reward_model.model, tokens))  # fmt: skip
    rows = rows[warmup : warmup + steps]
    median = sorted(rows, key=lambda r: r["seconds"])[len(rows) // 2]
    phases = {k: v for k, v in median.items() if k.startswith("seconds")}
    flops = sum(median["flops"].values())
    alone = run is None and not lora_r and not checkpointing
    products = product_seconds(policy, median["tokens"], median["completion_tokens"]) if alone else None
    reward_bytes = sum(p.numel() * p.element_size() for p in reward_model.model.parameters())
    policy_bytes = sum(p.numel() * p.element_size() for p in policy.parameters())
    return {
        "seconds_per_step": phases["seconds"],
        "samples_per_second": BATCH / phases["seconds"],
        "phases": phases,
        "flops_per_step": flops,
        "flops_per_phase": median["flops"],
        "n_params": n_params,
        "step_seconds": [row["seconds"] for row in rows],  # every measured step, in order
        "step_flops": [sum(row["flops"].values()) for row in rows],
        "product_seconds": products,  # the median step's matrix products alone, per phase
        "peak_rss_bytes": _peak_rss_bytes(),
        # policy + grads + Adam (2 moments) + anchor + init, and the reward model
        "lower_bound_bytes": 6 * policy_bytes + reward_bytes,
    }


def product_seconds(model, tokens: int, completion_tokens: int, repeats: int = 3) -> dict:
    """Seconds that a step's matrix products take alone, per phase: the fastest of `repeats`.

    The products of every linear layer at the step's shapes (random inputs), through the same
    libraries and weight layouts as the step: generation packs the weights for BATCH rows and
    runs the prompts' real tokens through them (the output layer at the BATCH last positions),
    then NEW_TOKENS − 1 decode steps of BATCH rows; the anchor's and the policy's forwards
    multiply at every real token (the output layer at BATCH · NEW_TOKENS positions), and the
    policy's backward adds ∂y W and ∂yᵀ x (`gemm.OneDnnLinear`). Attention's products are left
    out, as in `phase_flops`. What a phase takes beyond this is everything but the products.
    """
    import torch

    from warp_rlhf.cpu import gemm

    head = model.get_output_embeddings()
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    inputs: dict[tuple[int, int], torch.Tensor] = {}

    def random(rows: int, width: int) -> torch.Tensor:
        if (rows, width) not in inputs:
            inputs[rows, width] = torch.randn(rows, width)
        return inputs[rows, width]

    def rows(layer, body: int, at_head: int) -> int:
        return at_head if layer is head else body

    def generate():
        with torch.no_grad(), gemm.onednn_linears(model, rows=BATCH):
            for body in [tokens - completion_tokens] + [BATCH] * (NEW_TOKENS - 1):
                for layer in linears:
                    layer(random(rows(layer, body, BATCH), layer.in_features))

    def forward():
        for layer in linears:
            gemm.product(random(rows(layer, tokens, BATCH * NEW_TOKENS), layer.in_features), layer.weight)

    def backward():
        for layer in linears:
            n = rows(layer, tokens, BATCH * NEW_TOKENS)
            grad = random(n, layer.out_features)
            gemm.input_gradient(grad, layer.weight)
            grad.T @ random(n, layer.in_features)

    seconds_forward = _fastest(forward, repeats)
    return {
        "generate": _fastest(generate, repeats),
        "anchor": seconds_forward,
        "policy": seconds_forward + _fastest(backward, repeats),
    }


def _fastest(function, repeats: int) -> float:
    """The shortest of `repeats` timed calls, in seconds."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return min(times)


def measure_trl(steps: int, run: int | None = None) -> dict:
    """TRL's RLOOTrainer with the same model, batch, lengths, reward and an EMA reference (`run`:
    as in `measure_ours`, its seed)."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import RLOOConfig, RLOOTrainer

    config, policy_path, tokenizer, prompts, reward_model, load_causal_lm = _embedded()

    def reward(prompts, completions, **kwargs):
        return reward_model.score([p + c for p, c in zip(prompts, completions, strict=True)]).tolist()

    class StepClock(TrainerCallback):
        def __init__(self):
            self.ends = [time.perf_counter()]

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())

    clock = StepClock()
    with tempfile.TemporaryDirectory() as out:
        args = RLOOConfig(
            output_dir=out, per_device_train_batch_size=BATCH, num_generations=2, max_completion_length=NEW_TOKENS,
            temperature=config.temperature, top_k=0, top_p=1.0, beta=BETA, learning_rate=LR,
            max_steps=_steps_taken(steps, run)[1],
            sync_ref_model=True, ref_model_mixup_alpha=MU, ref_model_sync_steps=1, use_cpu=True, bf16=False,
            activation_checkpointing=False, report_to="none", save_strategy="no", logging_steps=1,
            disable_tqdm=True, seed=run or 0,
        )  # fmt: skip
        trainer = RLOOTrainer(
            model=policy_path, reward_funcs=reward, args=args, processing_class=tokenizer,
            train_dataset=Dataset.from_dict({"prompt": prompts}), callbacks=[clock],
        )  # fmt: skip
        trainer.train()
    warmup = _steps_taken(steps, run)[0]
    durations = [b - a for a, b in zip(clock.ends, clock.ends[1:], strict=False)][warmup : warmup + steps]
    seconds = sorted(durations)[len(durations) // 2]
    return {"seconds_per_step": seconds, "samples_per_second": BATCH / seconds, "steps": len(durations),
            "step_seconds": durations}  # fmt: skip


def measure_peak(steps: int = 0, run: None = None) -> dict:
    """fp32 matmul throughput (GFLOP/s): the best of several 2048 x 2048 products, from each of the
    two GEMM libraries torch has on CPU (MKL's `torch.mm`; oneDNN with a packed weight, which the
    fast paths use), so the peak is what the machine can do, not what one library does.
    """
    import torch

    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    products = {"mkl": lambda: torch.mm(a, b)}
    if rollout_can_prepack():
        packed = torch.ops.mkldnn._reorder_linear_weight(b.t().contiguous(), 2048)
        products["onednn"] = lambda: torch.ops.mkldnn._linear_pointwise(a, packed, None, "none", [], "")
    best = {}
    for name, product in products.items():
        product()
        best[name] = 0.0
        for _ in range(5):
            started = time.perf_counter()
            for _ in range(4):
                product()
            best[name] = max(best[name], 4 * 2 * 2048**3 / (time.perf_counter() - started))
    return {"fp32_matmul_flops": max(best.values()), "by_library": best}


def rollout_can_prepack() -> bool:
    import torch

    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def measure_merge(steps: int = 0, run: None = None) -> dict:
    """SLERP of M = 2 SmolLM2-sized policies against one torch.add over the same tensors."""
    import torch

    from warp_rlhf.algorithm.merge import merge_task_vectors, model_state

    _, policy_path, *_, load_causal_lm = _embedded()
    init = {k: v.detach() for k, v in model_state(load_causal_lm(policy_path)).items()}
    generator = torch.Generator().manual_seed(0)
    runs = [{k: v + 1e-3 * torch.randn(v.shape, generator=generator) for k, v in init.items()} for _ in range(2)]

    def merge():
        return merge_task_vectors(init, lambda m, name: runs[m][name], 2, 0.5)

    def add():
        return {k: torch.add(runs[0][k], runs[1][k]) for k in init}

    merge(), add()  # warm-up: both allocate their results the same way from here on
    merge_seconds, add_seconds = [], []
    for _ in range(5):  # interleaved, so a slow moment of the machine hits both
        merge_seconds.append(_fastest(merge, 1))
        add_seconds.append(_fastest(add, 1))
    return {"merge_seconds": min(merge_seconds), "add_seconds": min(add_seconds)}


def measure_lora(steps: int, run: None = None) -> dict:
    """Our step with LoRA adapters of rank `LORA_R` (only they train; the anchor is a full copy)."""
    return measure_ours(steps, run, lora_r=LORA_R)


def measure_checkpointing(steps: int, run: None = None) -> dict:
    """Our step with gradient checkpointing (each decoder layer recomputed in the backward pass)."""
    return measure_ours(steps, run, checkpointing=True)


MEASUREMENTS = {
    "ours": measure_ours, "lora": measure_lora, "checkpointing": measure_checkpointing, "trl": measure_trl,
    "peak": measure_peak, "merge": measure_merge,
}  # fmt: skip


def _command(name: str, steps: int, run: int | None = None, threads: int | None = None) -> list[str]:
    command = [sys.executable, __file__, "--only", name, "--steps", str(steps)]
    return command + (["--run", str(run), "--threads", str(threads)] if run else [])


def _environment(threads: int | None) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env | ({"OMP_NUM_THREADS": str(threads)} if threads else {})


def _result(name: str, returncode: int, stdout: str, stderr: str) -> dict:
    if returncode != 0:
        sys.stderr.write(stderr[-4000:])
        raise SystemExit(f"benchmark '{name}' failed")
    return json.loads(stdout.strip().splitlines()[-1])


def _child(name: str, steps: int) -> dict:
    """`name` measured in one process on all the cores."""
    result = subprocess.run(_command(name, steps), env=_environment(None), capture_output=True, text=True)
    return _result(name, result.returncode, result.stdout, result.stderr)


def _side_by_side(name: str, steps: int) -> list[dict]:
    """`name` measured in RUNS processes at once, each on its share of the cores, as
    `backend: processes` runs WARP's M runs (`runners.side_by_side`)."""
    processes, threads = side_by_side(RUNS)
    children = [
        subprocess.Popen(_command(name, steps, run, threads), env=_environment(threads), text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for run in range(1, processes + 1)
    ]  # fmt: skip
    outputs = [child.communicate() for child in children]
    return [_result(name, child.returncode, *output) for child, output in zip(children, outputs, strict=True)]


def utilisation(runs: list[dict], peak: float) -> dict:
    """Model-FLOPs utilisation of runs that stepped side by side, as one machine (`peak`: its fp32
    matmul FLOPs/s). Per measured step i: the runs' steps i, each run's FLOPs over its seconds,
    added, over the peak. `median`: the median of those, as step times are medians (one step that a
    neighbour slowed, or sped, does not move it; each step's rate, so a step with less work does
    not count for more); `all_steps`: every run's measured FLOPs over its seconds, added."""
    steps = zip(*[zip(run["step_flops"], run["step_seconds"], strict=True) for run in runs], strict=True)
    per_step = [sum(flops / seconds for flops, seconds in step) / peak for step in steps]
    all_steps = sum(sum(run["step_flops"]) / sum(run["step_seconds"]) for run in runs) / peak
    return {"median": statistics.median(per_step), "all_steps": all_steps, "per_step": per_step}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="measured steps after warm-up; the median counts")
    parser.add_argument("--only", choices=list(MEASUREMENTS), help=argparse.SUPPRESS)
    parser.add_argument("--run", type=int, help=argparse.SUPPRESS)  # set: run m of the runs side by side
    parser.add_argument("--threads", type=int, help=argparse.SUPPRESS)  # … and its torch threads
    args = parser.parse_args()
    if args.only:
        _start(args.only, args.threads)
        print(json.dumps(MEASUREMENTS[args.only](args.steps, args.run)))
        return
    with tempfile.TemporaryDirectory() as folder:
        os.environ[PROMPTS] = str(Path(folder) / "prompts.json")
        write_prompts(Path(os.environ[PROMPTS]))
        results = _measure_all(args.steps)
    write_results(summarise(results), args.steps)


def _start(name: str, threads: int | None) -> None:
    """The edge of a measured process: its torch threads, and for our step the allocator setting
    that the CLI and a run's process make at their start."""
    if threads:
        import torch

        torch.set_num_threads(threads)
    if name in OUR_STEP:
        from warp_rlhf.cpu import keep_freed_memory

        keep_freed_memory()


PLAN = [("peak", False), ("ours", True), ("ours", False), ("lora", False), ("checkpointing", False), ("peak", False),
        ("trl", True), ("peak", False), ("merge", False)]  # fmt: skip
"""The measurements in order, each (name, side by side); the peak three times, spread over the run."""


def _measure_all(steps: int) -> dict:
    """Each measurement of the plan in its own processes."""
    results = {}
    for name, beside in PLAN:
        print(f"measuring {name} ({'side by side' if beside else 'alone'}) …", file=sys.stderr, flush=True)
        record(results, name, _side_by_side(name, steps) if beside else _child(name, steps), beside)
    return results


def record(results: dict, name: str, result: dict | list[dict], beside: bool) -> None:
    """One measurement into `results`: the peak as the best so far (a slow moment of the machine
    does not lower it), the runs side by side with their samples/s added, the others as they are."""
    if name == "peak":
        peaks = [*results.get("peak", {}).get("measured", []), result]
        results["peak"] = {"fp32_matmul_flops": max(p["fp32_matmul_flops"] for p in peaks), "measured": peaks}
    elif beside:
        samples = sum(run["samples_per_second"] for run in result)
        results[f"{name}_side_by_side"] = {"runs": result, "samples_per_second": samples}
    else:
        results[f"{name}_alone" if name in OUR_STEP else name] = result


def summarise(results: dict) -> dict:
    """The targets and the figures derived from the measurements: what results.json holds."""
    peak = results["peak"]["fp32_matmul_flops"]
    ours, trl, alone = results["ours_side_by_side"], results["trl_side_by_side"], results["ours_alone"]
    runs = ours["runs"]
    ours["utilisation"], alone["utilisation"] = utilisation(runs, peak), utilisation([alone], peak)
    summary = {
        "ratio_vs_trl": ours["samples_per_second"] / trl["samples_per_second"],
        "mfu": ours["utilisation"]["median"],
        "merge_vs_add": results["merge"]["merge_seconds"] / results["merge"]["add_seconds"],
        "rss_vs_bound": sum(r["peak_rss_bytes"] for r in runs) / sum(r["lower_bound_bytes"] for r in runs),
    }
    lora_figures = {
        f"{name}_{figure}_vs_full": results[f"{name}_alone"][key] / alone[key]
        for name in ("lora", "checkpointing")
        if f"{name}_alone" in results
        for figure, key in (("step", "seconds_per_step"), ("rss", "peak_rss_bytes"))
    }
    alone["utilisation_per_phase"] = {
        phase: flops / alone["phases"][f"seconds_{phase}"] / peak for phase, flops in alone["flops_per_phase"].items()
    }
    alone["mfu_products_only"] = products_only_mfu(alone, peak)
    planned = {name: planned_peak(name) / results[f"{name}_alone"]["peak_rss_bytes"]
               for name in OUR_STEP if f"{name}_alone" in results}  # fmt: skip
    return {**summary, **lora_figures, "plan_vs_rss": planned, "details": results,
            "command": "python benchmarks/run.py", "torch_threads": _threads(),
            "side_by_side_threads": side_by_side(RUNS)[1]}  # fmt: skip


def planned_peak(name: str) -> int:
    """`warp-rlhf plan`'s peak of one run of our step `name` (`OUR_STEP`), from its config alone."""
    from warp_rlhf.stages.plan import plan

    return plan(_config(LORA_R if name == "lora" else 0, checkpointing=name == "checkpointing")).run.peak


def write_results(results: dict, steps: int) -> None:
    """results.json, and RESULTS.md rendered from it for `steps` measured steps."""
    (HERE / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (HERE / "RESULTS.md").write_text(results_markdown(results, steps))
    print(json.dumps({target: results[target] for target in TARGETS}, indent=2))


def products_only_mfu(ours: dict, peak: float) -> float:
    """The median step's mfu had its generate, anchor and policy phases taken only their matrix
    products (`product_seconds`), the other phases as measured: what the products allow."""
    seconds = ours["phases"]["seconds"] + sum(
        products - ours["phases"][f"seconds_{phase}"] for phase, products in ours["product_seconds"].items()
    )
    return ours["flops_per_step"] / seconds / peak


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def results_markdown(results: dict, steps: int) -> str:
    """RESULTS.md: the template with every field filled in (a field the template names and
    `results_fields` lacks is a KeyError, not a gap in the text)."""
    return Template(TEMPLATE.read_text()).substitute(results_fields(results, steps))


def results_fields(results: dict, steps: int) -> dict[str, str]:
    """Every `${field}` of the template, as text; `steps`: the measured steps of each run."""
    targets = {target: f"{results[target]:.2f}" for target in TARGETS}
    return {**_setup_fields(results, steps), **targets, **_measurement_fields(results),
            **_split_fields(results["details"])}  # fmt: skip


def _setup_fields(results: dict, steps: int) -> dict[str, str]:
    """What was measured and how: sizes, cores, runs, measured and warm-up steps."""
    details = results["details"]
    warmup, taken = _steps_taken(steps, run=1)
    return {
        "batch": str(BATCH), "prompt_tokens": str(MAX_PROMPT_TOKENS), "new_tokens": str(NEW_TOKENS),
        "cores": _count(results["torch_threads"], "core"), "runs": str(len(details["ours_side_by_side"]["runs"])),
        "side_by_side_threads": _count(results["side_by_side_threads"], "torch thread"),
        "trl_runs": str(len(details["trl_side_by_side"]["runs"])), "steps": _count(steps, "step"),
        "warmup_alone": _count(_steps_taken(steps, run=None)[0], "step"), "warmup_side_by_side": _count(warmup, "step"),
        "after_side_by_side": _count(taken - warmup - steps, "step"),
    }  # fmt: skip


def _measurement_fields(results: dict) -> dict[str, str]:
    """The second table: each trainer's runs, mfu per step, the run alone, LoRA, peak, merge, memory."""
    d, gib = results["details"], 2**30
    ours, trl, alone = d["ours_side_by_side"], d["trl_side_by_side"], d["ours_alone"]
    memory = f"{_spread([r['peak_rss_bytes'] / gib for r in ours['runs']])} / {alone['lower_bound_bytes'] / gib:.2f}"
    libraries = " / ".join(
        f"{name} {max(p['by_library'][name] for p in d['peak']['measured']) / 1e9:.0f}"
        for name in d["peak"]["measured"][0]["by_library"]
    )
    return {
        "our_rows": _trainer_rows("our", ours), "our_samples": f"{ours['samples_per_second']:.2f}",
        "trl_rows": _trainer_rows("TRL RLOOTrainer", trl), "trl_samples": f"{trl['samples_per_second']:.2f}",
        "mfu_per_step": _spread(ours["utilisation"]["per_step"]),
        "mfu_all_steps": f"{ours['utilisation']['all_steps']:.2f}",
        "alone_step": f"{alone['seconds_per_step']:.2f} s, {alone['samples_per_second']:.2f} samples/s"
                      f" (each step: {_spread(alone['step_seconds'])} s)",
        "alone_mfu": f"{alone['utilisation']['median']:.2f}", "lora_rank": str(LORA_R),
        "lora_step": _against_full(results, "lora", "the full step"),
        "checkpointing_step": _against_full(results, "checkpointing", "the step without it"),
        "mfu_products_only": f"{alone['mfu_products_only']:.2f}", "peak_libraries": libraries,
        "peak": f"{d['peak']['fp32_matmul_flops'] / 1e9:.0f}", "flops_per_step": f"{alone['flops_per_step'] / 1e9:.0f}",
        "merge_seconds": f"{d['merge']['merge_seconds']:.2f}", "add_seconds": f"{d['merge']['add_seconds']:.2f}",
        "memory": memory, "plan_vs_rss": _plan_figures(results),
    }  # fmt: skip


def _against_full(results: dict, name: str, full: str) -> str:
    """`name`'s run alone against our plain step alone (`full`: what to call it): step time and
    peak RSS, and their ratios (`summarise`), or a dash where results.json predates the measurement."""
    d, gib = results["details"], 2**30
    if f"{name}_alone" not in d:
        return "– (not in this results.json: measured by the next `make bench`)"
    run, alone = d[f"{name}_alone"], d["ours_alone"]
    return (
        f"{run['seconds_per_step']:.2f} s per step ({results[f'{name}_step_vs_full']:.2f}x {full}), peak RSS"
        f" {run['peak_rss_bytes'] / gib:.2f} GiB against {alone['peak_rss_bytes'] / gib:.2f} GiB"
        f" ({results[f'{name}_rss_vs_full']:.2f}x)"
    )


def _plan_figures(results: dict) -> str:
    """Planned ÷ measured peak of each run alone, or a dash where results.json predates the plan."""
    planned = results.get("plan_vs_rss", {})
    return " / ".join(f"{planned[name]:.2f}" if name in planned else "–" for name in OUR_STEP)


def _split_fields(details: dict) -> dict[str, str]:
    """The split of a step: each phase's seconds in each run side by side and alone, the alone
    run's FLOPs/s of the phase over the peak, and its matrix products timed alone."""
    ours, alone = details["ours_side_by_side"], details["ours_alone"]
    use, products = alone["utilisation_per_phase"], alone["product_seconds"]
    rows = [
        f"| {phase} | {_spread([run['phases'][key] for run in ours['runs']], ' | ')} | {alone['phases'][key]:.2f}"
        f" | {use.get(phase, 0):.2f} | {_products(products.get(phase))} |"
        for key in alone["phases"]
        if (phase := key.removeprefix("seconds_")) != "seconds"
    ]
    columns = [f"run {m}" for m in range(1, len(ours["runs"]) + 1)]
    return {"run_columns": " | ".join(columns), "run_rules": "---|" * len(columns), "split": "\n".join(rows)}


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _trainer_rows(name: str, side_by_side: dict) -> str:
    return "\n".join(
        f"| {name} run {m}, side by side | {run['seconds_per_step']:.2f} s, {run['samples_per_second']:.2f} samples/s"
        f" (each step: {_spread(run['step_seconds'])} s) |"
        for m, run in enumerate(side_by_side["runs"], start=1)
    )


def _products(seconds: float | None) -> str:
    return "–" if seconds is None else f"{seconds:.2f}"


def _spread(values: list[float], separator: str = ", ") -> str:
    return separator.join(f"{v:.2f}" for v in values)


if __name__ == "__main__":
    main()
