"""One command, one run: our WARP step against TRL's RLOOTrainer and against the hardware.

    .venv/bin/python benchmarks/run.py            (or: make bench)

On the embedded SmolLM2-135M policy, batch 16, prompts of at most 16 tokens, 24 new tokens:
- our RL step: samples/s and the split of a step (generate, reward, anchor, policy, optimizer, ema);
- TRL RLOOTrainer, same model, batch, lengths and reward, num_generations = 2, reference model
  synced as an EMA every step: samples/s, and the ratio;
- model-FLOPs utilisation of our step against the fp32 matmul peak measured in this run (the
  best of three measurements: before, between and after the trainers): the model FLOPs of all
  measured steps over their seconds; and the same had each phase taken only its matrix
  products, timed alone at the step's shapes (what the products allow);
- SLERP merge of M = 2 policies against one torch.add pass over the same tensors;
- peak resident memory of a training process against the lower bound (policy + grads + Adam
  states + anchor + init + reward model bytes).
Each measurement runs in its own process (one at a time, so they never share the 2 cores),
and writes benchmarks/results.json and benchmarks/RESULTS.md. Step times are the median of the
measured steps (after a warm-up step), for us and for TRL alike: on a shared VM a median is not
moved by one step that a neighbour slowed down.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BATCH, NEW_TOKENS, MAX_PROMPT_TOKENS, MU, BETA, LR = 16, 24, 16, 0.01, 0.1, 1e-5


def _embedded():
    import torch

    from warp_rlhf import assets
    from warp_rlhf.config import WarpConfig
    from warp_rlhf.data import load_reviews, split_reviews
    from warp_rlhf.models import load_causal_lm, load_tokenizer
    from warp_rlhf.reward import RewardModel

    config = WarpConfig(
        batch_size=BATCH, max_new_tokens=NEW_TOKENS, ema_rate=MU, beta=BETA, learning_rate=LR, device="cpu",
        prompt_min_tokens=4, prompt_max_tokens=MAX_PROMPT_TOKENS, reward_train_pairs=10, reward_eval_pairs=10,
        rl_prompts=256, eval_prompts=10,
    )  # fmt: skip
    policy_path = assets.resolve_policy(config)
    tokenizer = load_tokenizer(policy_path, padding_side="left")
    prompts = split_reviews(load_reviews(config), config, tokenizer).rl_prompts
    from transformers import AutoModelForSequenceClassification

    backbone = assets.resolve_backbone(config)
    torch.manual_seed(0)
    reward_model = RewardModel(
        AutoModelForSequenceClassification.from_pretrained(backbone, num_labels=1), load_tokenizer(backbone)
    )
    return config, policy_path, tokenizer, prompts, reward_model, load_causal_lm


def phase_flops(n_params: int, n_output: int, tokens: float, completion_tokens: float, reward: float) -> dict:
    """Model FLOPs of each phase of one step: 2 per weight per token for a forward, 4 more for a backward.

    The output layer (`n_output` weights, tied to the input embedding, whose lookup costs no
    FLOPs) runs only where a completion token is predicted; the rest of the model on every
    real token (padding excluded). Generation feeds every token but the last of each row
    (prefill + decode); the policy's training forward + backward and the anchor's forward see
    the whole sequence. `reward` is the reward model's forward, counted the same way by the
    caller. Attention's own products (QKᵀ, AV: under 1% at these lengths) are left out.
    """
    body = n_params - n_output
    forward = 2 * (body * tokens + n_output * completion_tokens)
    generation = 2 * (body * (tokens - BATCH) + n_output * completion_tokens)
    return {"generate": generation, "reward": reward, "anchor": forward, "policy": 3 * forward}


def _forward_flops(model, tokens: int) -> float:
    """2 FLOPs per weight per token, the input embedding (a lookup) left out."""
    body = sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()
    return 2.0 * body * tokens


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure_ours(steps: int) -> dict:
    """Our Trainer.step on SmolLM2: the median step (its seconds per phase and FLOPs), and peak RSS."""
    from warp_rlhf.warp import RunSpec, Trainer

    config, policy_path, tokenizer, prompts, reward_model, load_causal_lm = _embedded()
    policy = load_causal_lm(policy_path)

    reward_tokens = []  # real (unpadded) tokens the reward model reads, per step

    def reward(batch_prompts, completions):
        texts = [p + c for p, c in zip(batch_prompts, completions, strict=True)]
        encoded = reward_model.tokenizer(texts, truncation=True, max_length=reward_model.max_length)
        reward_tokens.append(sum(len(ids) for ids in encoded["input_ids"]))
        return reward_model.score(texts)

    trainer = Trainer(config, policy, tokenizer, reward, prompts)
    with tempfile.TemporaryDirectory() as folder:
        trainer.run(RunSpec(1, 1, Path(folder), MU), None, steps + 1)  # the real code path, checkpoint files included
        rows = [json.loads(line) for line in (Path(folder) / "metrics.jsonl").read_text().splitlines()]
    n_params = sum(p.numel() for p in policy.parameters())
    output_weights = policy.get_output_embeddings().weight.numel()
    for row, tokens in zip(rows, reward_tokens, strict=True):
        row["flops"] = phase_flops(n_params, output_weights, row["tokens"], row["completion_tokens"],
                                   _forward_flops(reward_model.model, tokens))  # fmt: skip
    rows = rows[1:]  # the first step warms up
    median = sorted(rows, key=lambda r: r["seconds"])[len(rows) // 2]
    phases = {k: v for k, v in median.items() if k.startswith("seconds")}
    flops = sum(median["flops"].values())
    products = product_seconds(policy, median["tokens"], median["completion_tokens"])
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

    from warp_rlhf import gemm

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


def measure_trl(steps: int) -> dict:
    """TRL's RLOOTrainer with the same model, batch, lengths, reward and an EMA reference."""
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
            temperature=config.temperature, top_k=0, top_p=1.0, beta=BETA, learning_rate=LR, max_steps=steps + 1,
            sync_ref_model=True, ref_model_mixup_alpha=MU, ref_model_sync_steps=1, use_cpu=True, bf16=False,
            activation_checkpointing=False, report_to="none", save_strategy="no", logging_steps=1,
            disable_tqdm=True, seed=0,
        )  # fmt: skip
        trainer = RLOOTrainer(
            model=policy_path, reward_funcs=reward, args=args, processing_class=tokenizer,
            train_dataset=Dataset.from_dict({"prompt": prompts}), callbacks=[clock],
        )  # fmt: skip
        trainer.train()
    durations = [b - a for a, b in zip(clock.ends, clock.ends[1:], strict=False)][1:]  # first: warm-up
    seconds = sorted(durations)[len(durations) // 2]
    return {"seconds_per_step": seconds, "samples_per_second": BATCH / seconds, "steps": len(durations),
            "step_seconds": durations}  # fmt: skip


def measure_peak(steps: int = 0) -> dict:
    """fp32 matmul throughput (GFLOP/s): the best of several 2048 x 2048 products, from each of the
    two GEMM libraries torch has on CPU (MKL's `torch.mm`; oneDNN with a packed weight, which is
    about 15% faster here), so the peak is what the machine can do, not what one library does.
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


def measure_merge(steps: int = 0) -> dict:
    """SLERP of M = 2 SmolLM2-sized policies against one torch.add over the same tensors."""
    import torch

    from warp_rlhf.merge import model_state, slerp_merge

    _, policy_path, *_, load_causal_lm = _embedded()
    init = {k: v.detach() for k, v in model_state(load_causal_lm(policy_path)).items()}
    generator = torch.Generator().manual_seed(0)
    runs = [{k: v + 1e-3 * torch.randn(v.shape, generator=generator) for k, v in init.items()} for _ in range(2)]

    def merge():
        return slerp_merge(init, lambda m, name: runs[m][name], 2, 0.5)

    def add():
        return {k: torch.add(runs[0][k], runs[1][k]) for k in init}

    merge(), add()  # warm-up: both allocate their results the same way from here on
    merge_seconds, add_seconds = [], []
    for _ in range(5):  # interleaved, so a slow moment of the machine hits both
        merge_seconds.append(_fastest(merge, 1))
        add_seconds.append(_fastest(add, 1))
    return {"merge_seconds": min(merge_seconds), "add_seconds": min(add_seconds)}


MEASUREMENTS = {"ours": measure_ours, "trl": measure_trl, "peak": measure_peak, "merge": measure_merge}


def _child(name: str, steps: int) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    command = [sys.executable, __file__, "--only", name, "--steps", str(steps)]
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.stderr.write(result.stderr[-4000:])
        raise SystemExit(f"benchmark '{name}' failed")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="measured steps after one warm-up step; the median counts")
    parser.add_argument("--only", choices=list(MEASUREMENTS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.only:
        print(json.dumps(MEASUREMENTS[args.only](args.steps)))
        return
    results, peaks = {}, []
    for name in ("peak", "ours", "peak", "trl", "peak", "merge"):
        print(f"measuring {name} …", file=sys.stderr, flush=True)
        result = _child(name, args.steps)
        if name == "peak":  # the best of three, spread over the run: a slow moment does not lower it
            peaks.append(result)
            result = {"fp32_matmul_flops": max(p["fp32_matmul_flops"] for p in peaks), "measured": peaks}
        results[name] = result
    ours, trl = results["ours"], results["trl"]
    summary = {
        "ratio_vs_trl": ours["samples_per_second"] / trl["samples_per_second"],
        "mfu": sum(ours["step_flops"]) / sum(ours["step_seconds"]) / results["peak"]["fp32_matmul_flops"],
        "merge_vs_add": results["merge"]["merge_seconds"] / results["merge"]["add_seconds"],
        "rss_vs_bound": ours["peak_rss_bytes"] / ours["lower_bound_bytes"],
    }
    peak, ours = results["peak"]["fp32_matmul_flops"], results["ours"]
    ours["mfu_per_step"] = [f / s / peak for f, s in zip(ours["step_flops"], ours["step_seconds"], strict=True)]
    ours["utilisation_per_phase"] = {
        phase: flops / ours["phases"][f"seconds_{phase}"] / peak for phase, flops in ours["flops_per_phase"].items()
    }
    ours["mfu_products_only"] = products_only_mfu(ours, peak)
    results = {**summary, "details": results, "command": "python benchmarks/run.py", "torch_threads": _threads()}
    (HERE / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (HERE / "RESULTS.md").write_text(results_markdown(results))
    print(json.dumps(summary, indent=2))


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


def results_markdown(results: dict) -> str:
    d = results["details"]
    gib = 2**30
    phases = d["ours"]["phases"]
    use, products = d["ours"]["utilisation_per_phase"], d["ours"]["product_seconds"]
    split = "\n".join(
        f"| {phase} | {v:.2f} | {use.get(phase, 0):.2f} | {_products(products.get(phase))} |"
        for k, v in phases.items()
        if (phase := k.removeprefix("seconds_")) != "seconds"
    )
    libraries = " / ".join(
        f"{name} {max(p['by_library'][name] for p in d['peak']['measured']) / 1e9:.0f}"
        for name in d["peak"]["measured"][0]["by_library"]
    )
    steps = {
        name: f"{d[name]['seconds_per_step']:.2f} s, {d[name]['samples_per_second']:.2f} samples/s"
        f" (each step: {_spread(d[name]['step_seconds'])} s)"
        for name in ("ours", "trl")
    }
    return f"""# Benchmark results

Reproduce: `make bench` (= `.venv/bin/python benchmarks/run.py`), on an otherwise idle machine.
Step times are the median of 5 steps after a warm-up step, for both trainers (each step is listed:
this shared VM moves them); mfu is the model FLOPs of those 5 steps over their seconds; the split
is the median step's.
SmolLM2-135M policy, batch 16, prompts of at most 16 tokens, 24 new tokens, {results["torch_threads"]} torch threads.

| metric | value | target |
|---|---|---|
| ratio_vs_trl (our samples/s ÷ TRL RLOOTrainer samples/s) | {results["ratio_vs_trl"]:.2f} | ≥ 1.5 |
| mfu (model FLOPs/s ÷ fp32 matmul peak, over the measured steps) | {results["mfu"]:.2f} | ≥ 0.6 |
| merge_vs_add (SLERP of 2 policies ÷ one torch.add pass) | {results["merge_vs_add"]:.2f} | ≤ 2 |
| rss_vs_bound (peak RSS ÷ weights, grads, Adam, anchor, init, reward model) | {results["rss_vs_bound"]:.2f} | ≤ 1.3 |

| measurement | value |
|---|---|
| our step | {steps["ours"]} |
| TRL RLOOTrainer step | {steps["trl"]} |
| mfu of each measured step (how much the host moves it) | {_spread(d["ours"]["mfu_per_step"])} |
| mfu of the median step, its phases taking only their matrix products | {d["ours"]["mfu_products_only"]:.2f} |
| fp32 matmul peak (best of: {libraries}) | {d["peak"]["fp32_matmul_flops"] / 1e9:.0f} GFLOP/s |
| model FLOPs per step | {d["ours"]["flops_per_step"] / 1e9:.0f} GFLOP |
| SLERP merge / torch.add | {d["merge"]["merge_seconds"]:.2f} s / {d["merge"]["add_seconds"]:.2f} s |
| peak RSS / lower bound | {d["ours"]["peak_rss_bytes"] / gib:.2f} / {d["ours"]["lower_bound_bytes"] / gib:.2f} GiB |

Split of our step: seconds, model FLOPs/s of the phase ÷ the peak (optimizer and EMA: no model FLOPs),
and the seconds of the phase's matrix products alone at the same shapes (`product_seconds`):

| phase | seconds | FLOPs/s ÷ peak | matrix products alone |
|---|---|---|---|
{split}

{(HERE / "NOTES.md").read_text()}"""


def _products(seconds: float | None) -> str:
    return "–" if seconds is None else f"{seconds:.2f}"


def _spread(values: list[float]) -> str:
    return ", ".join(f"{v:.2f}" for v in values)


if __name__ == "__main__":
    main()
