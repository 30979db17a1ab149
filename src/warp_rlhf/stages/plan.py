"""`warp-rlhf plan`: the memory of one run and of one machine, from the config alone.

The policy's shapes come from its config file: the model is built on the meta device (PEFT's
adapters too, with `lora_r`), so no weight is loaded and nothing is written. A run holds

- θ, the policy's weights, in fp32 (with `precision: bf16` too: autocast computes in bf16, the
  master weights stay fp32), and with LoRA the adapters A, B;
- AdamW's two moments of what trains (with LoRA, the adapters alone);
- the EMA anchor θ_ema, a full fp32 copy;
- θ_init on disk only: it is read into θ and θ_ema when the run starts, not kept;
- the reward model(s) it scores with;

and, one phase at a time,

- generation: the KV cache of the batch, and on a CPU in fp32 the decode's packed copy of every
  linear layer's weight (`cpu.onednn_linears`);
- the training forward and backward of a micro-batch: the activations kept for the backward pass
  (per layer, per token: what `cpu.lean_backward` keeps), or with gradient checkpointing each
  layer's input and one layer's activations at a time; the log-probabilities' (B·L, V) logits;
  the output layer's gradient, the first the backward pass makes, or every gradient at its end
  (they are freed after the optimiser's step);
- the EMA with LoRA: the merged weights W + (α/r)·B·A of the adapted layers.

Lengths are their upper bounds (`prompt_max_tokens` + `max_new_tokens`). On a CPU the process
adds the Python, torch and transformers runtime (`CPU_RUNTIME`) and the shared libraries' pages
(`CPU_LIBRARIES`), and glibc's heap keeps more than the most in use (`HEAP_SLACK`); on a GPU each
process adds its CUDA context (`CUDA_CONTEXT`), outside torch's allocator. Per device, the
backend decides how many runs share it (`placement`).
"""

from __future__ import annotations

import copy
import functools
import os
from dataclasses import dataclass

import torch

from warp_rlhf.algorithm.reinforce import checkpoints_gradients
from warp_rlhf.config import EMBEDDED, WarpConfig
from warp_rlhf.stages import assets
from warp_rlhf.stages.models import model_config
from warp_rlhf.stages.rewards import TRAINED, classifier_model, specs

GIB = 2**30
FP32, BF16 = 4, 2
CPU_RUNTIME = int(0.29 * GIB)
"""What a run process allocates before its models, on a CPU: the interpreter, torch's and
transformers' objects, the tokenizer and the prompts (measured with torch 2.13: 0.29 GiB of
anonymous resident memory at the peak of a run of the tiny test models)."""
CPU_LIBRARIES = int(0.17 * GIB)
"""The pages of the shared libraries (torch's above all) that a run process touches, which its
resident memory counts too: 0.17 GiB measured, more when the page cache holds more of them."""
HEAP_SLACK = 0.3
"""glibc's heap beyond the most in use, as a fraction of the largest phase's own memory: the blocks
a step frees and those it allocates rarely fit each other (measured on SmolLM2-135M, full and
LoRA, with and without checkpointing: 0.2–0.45)."""
CUDA_CONTEXT = int(0.5 * GIB)
"""A process's CUDA context and kernels on its GPU, which torch's allocator does not count."""


@dataclass(frozen=True)
class Shape:
    """What a model's memory depends on, read from its config on the meta device."""

    params: int  # every weight, a tied one once
    trainable: int  # what trains: every weight, or LoRA's adapters
    adapted: int  # the weights LoRA adapts (0 without LoRA)
    linear: int  # weights of the linear layers, LoRA's included
    output: int  # the output layer's weights
    layers: int
    hidden: int
    intermediate: int
    kv: int  # key (or value) width per token: key-value heads × head dim
    vocab: int
    gated: bool  # a gated MLP (gate_proj, up_proj, down_proj)
    output_is_linear: bool  # an nn.Linear without bias: the CPU fuses it with the log-softmax

    @property
    def adapters(self) -> int:
        return self.trainable if self.adapted else 0


def policy_config(config: WarpConfig):
    """The policy's transformers config: its config file, or the embedded GGUF's metadata."""
    if config.policy == EMBEDDED:
        return copy.deepcopy(_embedded_config())
    return model_config(config.policy, "policy", trust_remote_code=config.trust_remote_code)


@functools.cache
def _embedded_config():
    """The embedded SmolLM2's config, read once from its GGUF file (seconds: the file is parsed)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(assets.package_dir(assets.POLICY_PACKAGE)), gguf_file=assets.POLICY_GGUF)


def on_meta(auto_class, model_cfg, config: WarpConfig) -> torch.nn.Module:
    """A model of `model_cfg` built on the meta device: shapes without weights."""
    with torch.device("meta"):
        return auto_class.from_config(model_cfg, trust_remote_code=config.trust_remote_code)


def model_shape(model_cfg, config: WarpConfig) -> Shape:
    """The `Shape` of a causal LM with `model_cfg`, built on the meta device (with `config.lora_r`,
    with its adapters)."""
    from transformers import AutoModelForCausalLM

    from warp_rlhf.algorithm import lora

    model = on_meta(AutoModelForCausalLM, model_cfg, config)
    if config.lora_r > 0:
        lora.add_adapters(model, config)
    params = list(model.parameters())
    head = model.get_output_embeddings()
    hidden, heads = model_cfg.hidden_size, model_cfg.num_attention_heads
    head_dim = getattr(model_cfg, "head_dim", None) or hidden // heads
    kv_heads = getattr(model_cfg, "num_key_value_heads", None) or heads
    intermediate = getattr(model_cfg, "intermediate_size", None) or getattr(model_cfg, "n_inner", None) or 4 * hidden
    return Shape(
        params=sum(p.numel() for p in params),
        trainable=sum(p.numel() for p in params if p.requires_grad),
        adapted=sum(m.base_layer.weight.numel() for m in lora.adapted(model).values()) if config.lora_r else 0,
        linear=sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear)),
        output=head.weight.numel(),
        layers=model_cfg.num_hidden_layers,
        hidden=hidden,
        intermediate=intermediate,
        kv=kv_heads * head_dim,
        vocab=head.weight.shape[0],
        gated=any(hasattr(m, "gate_proj") and hasattr(m, "up_proj") for m in model.modules()),
        output_is_linear=isinstance(head, torch.nn.Linear) and head.bias is None,
    )


def reward_params(config: WarpConfig) -> int:
    """Weights of the reward models a run scores with: the trained one (its backbone with one
    output; `reward_ensemble: ens` scores with each of the `reward_models` members) and every
    classifier in `reward_funcs`; functions hold none."""
    from transformers import AutoModelForSequenceClassification

    total = 0
    for spec in specs(config):
        name = assets.resolve_backbone(config) if spec == TRAINED else classifier_model(spec)
        if name is None:
            continue
        model_cfg = model_config(name, "reward", trust_remote_code=config.trust_remote_code)
        copies = 1
        if spec == TRAINED:
            model_cfg.num_labels = 1
            copies = config.reward_models if config.reward_ensemble == "ens" else 1
        model = on_meta(AutoModelForSequenceClassification, model_cfg, config)
        total += copies * sum(p.numel() for p in model.parameters())
    return total


def plan_device(config: WarpConfig) -> str:
    """cpu or cuda, as the run would choose, without checking that this machine has it: a plan
    may be for another machine."""
    if config.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cuda" if config.device.startswith("cuda") else "cpu"


@dataclass(frozen=True)
class Line:
    """One row of the plan: what, its bytes, when it is held (`HELD` or a phase), and a note."""

    what: str
    bytes: int
    when: str
    note: str = ""


HELD, GENERATION, TRAINING, EMA = "throughout", "generation", "training", "EMA"


@dataclass(frozen=True)
class RunMemory:
    """One run's memory: its lines, the peak of each phase, and the largest."""

    lines: list[Line]
    phases: dict[str, int]  # phase → the whole run's bytes at its peak

    @property
    def peak(self) -> int:
        return max(self.phases.values())

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phases.get)


def activation_bytes(shape: Shape, config: WarpConfig, device: str, checkpointing: bool) -> int:
    """What one micro-batch's training forward keeps for its backward pass.

    Per token of a layer, in the compute precision (fp32, or bf16 under autocast): the normed
    input to the attention's projections, the query, keys and values, the attention's output and
    its contiguous copy for the output projection, the normed input to the MLP, and the MLP's
    gate and up outputs (`lean_backward`; with LoRA on the MLP, also act(gate) and the product);
    in fp32, the residual stream's two norm inputs. With checkpointing, each layer keeps its input
    and one layer at a time recomputes the rest. Then the final norm's input, and the logits.
    """
    tokens = micro_batch(config) * (config.prompt_max_tokens + config.max_new_tokens)
    compute = BF16 if config.precision == "bf16" else FP32
    mlp = (2 if config.lora_r == 0 else 4) * shape.intermediate if shape.gated else 2 * shape.intermediate
    layer = tokens * (2 * shape.hidden * FP32 + (5 * shape.hidden + 2 * shape.kv + mlp) * compute)
    kept = shape.layers * tokens * shape.hidden * FP32 + layer if checkpointing else shape.layers * layer
    return kept + tokens * shape.hidden * FP32 + logit_bytes(shape, config, device)


def micro_batch(config: WarpConfig) -> int:
    return config.batch_size // config.grad_accumulation_steps


def logit_bytes(shape: Shape, config: WarpConfig, device: str) -> int:
    """The (B·L, V) logits of a micro-batch's log-probabilities and the output layer's input:
    the logits kept in fp32 where the CPU fuses the output layer with the log-softmax
    (`cpu.fuses_head`); elsewhere with their fp32 gradient, and under bf16 autocast the output
    layer's own bf16 logits."""
    positions = micro_batch(config) * config.max_new_tokens
    fused = device == "cpu" and config.precision == "fp32" and shape.output_is_linear
    per_logit = FP32 if fused else 2 * FP32 + (BF16 if config.precision == "bf16" else 0)
    return positions * (shape.vocab * per_logit + shape.hidden * FP32)


def run_memory(shape: Shape, config: WarpConfig, reward: int, device: str) -> RunMemory:
    """One run of `config` on `device` (cpu or cuda): its lines and the peak of each phase."""
    cpu, lora = device == "cpu", config.lora_r > 0
    base = (shape.params - shape.adapters) * FP32  # one plain copy of the model
    compute = BF16 if config.precision == "bf16" else FP32
    checkpointing = checkpoints_gradients(config, torch.device(device))
    activations = {ckpt: activation_bytes(shape, config, device, ckpt) for ckpt in (False, True)}
    output_grad, grads = (0 if lora else shape.output * FP32), shape.trainable * FP32
    chosen = "with" if checkpointing else "without"
    lines = [
        Line("θ, the policy (fp32" + ("; LoRA's A, B included)" if lora else ")"), shape.params * FP32, HELD),
        Line("AdamW moments (2)", 2 * shape.trainable * FP32, HELD, "LoRA's adapters only" if lora else ""),
        Line("θ_ema, the EMA anchor (fp32)", base, HELD),
        Line("θ_init", 0, HELD, "on disk: read into θ and θ_ema at the run's start"),
        Line("reward model(s)", reward * FP32, HELD),
        *([Line("the SFT model beside LoRA's copy", base, HELD, "backend local")] if lora and config.backend == "local"
          else []),
        *([Line("runtime: interpreter, torch, transformers", CPU_RUNTIME, HELD),
           Line("shared libraries' pages", CPU_LIBRARIES, HELD, "file-backed; more with a warm page cache")]
          if cpu else []),
        Line("KV cache", 2 * 2 * shape.layers * config.batch_size * (config.prompt_max_tokens + config.max_new_tokens)
             * shape.kv * compute, GENERATION, "twice: a copy while it fills"),
        *([Line("linear weights packed for the decode", shape.linear * FP32, GENERATION, "oneDNN")]
          if cpu and config.precision == "fp32" else []),
        Line(f"activations {chosen} gradient checkpointing", activations[checkpointing], TRAINING,
             f"{micro_batch(config)} rows; {'without' if checkpointing else 'with'}: "
             f"{size(activations[not checkpointing])}"),
        Line("output layer's gradient", output_grad, TRAINING, "the backward pass's first"),
        Line("gradients", grads, TRAINING, "complete at the backward pass's end"),
        *([Line("merged weights W + (α/r)·B·A", shape.adapted * FP32, EMA)] if lora else []),
    ]  # fmt: skip
    training = max(activations[checkpointing] + output_grad, grads)
    return RunMemory(lines, _phases(lines, training, shape, config, reward, cpu))


def _phases(
    lines: list[Line], training: int, shape: Shape, config: WarpConfig, reward: int, cpu: bool
) -> dict[str, int]:
    """Each phase's peak: what is held, plus the phase's own (`training`: the activations and the
    output layer's gradient early in the backward pass, or every gradient at its end), plus on a
    CPU the heap's slack; and the run while it is built (two or, with LoRA, three model copies)."""
    held = sum(line.bytes for line in lines if line.when == HELD)
    transient = {GENERATION: sum(line.bytes for line in lines if line.when == GENERATION), TRAINING: training,
                 EMA: sum(line.bytes for line in lines if line.when == EMA)}  # fmt: skip
    slack = HEAP_SLACK if cpu else 0.0
    phases = {phase: held + int(amount * (1 + slack)) for phase, amount in transient.items()}
    copies = 3 if config.lora_r > 0 else 2
    phases["building the run"] = copies * (shape.params - shape.adapters) * FP32 + reward * FP32 + (
        CPU_RUNTIME + CPU_LIBRARIES if cpu else 0
    )
    return phases


@dataclass(frozen=True)
class Placement:
    """How one device (a GPU, or a CPU machine's memory) is shared: `runs` at once, each `per_run`
    bytes, beside the driver's `driver` bytes; `capacity`: the device's, where known."""

    device: str
    runs: int
    per_run: int
    driver: int
    capacity: int | None
    how: str

    @property
    def total(self) -> int:
        return self.runs * self.per_run + self.driver


def placement(config: WarpConfig, device: str, run: RunMemory, shape: Shape, reward: int) -> Placement:
    """The device the runs of an iteration share under `backend`: `local` one run at a time (the
    driver is the run); `processes` side by side (`runners.side_by_side`), beside the driver that
    holds the SFT model and the rewards; `ray` with GPUs, ⌊1 / ray_num_gpus⌋ runs per GPU (the
    driver elsewhere), on CPUs as many as this machine's cores hold of `ray_num_cpus`."""
    from warp_rlhf.runners import side_by_side

    cuda = device == "cuda"
    per_run = run.peak + (CUDA_CONTEXT if cuda else 0)
    driver = (shape.params - shape.adapters + reward) * FP32 + (CUDA_CONTEXT if cuda else CPU_RUNTIME + CPU_LIBRARIES)
    capacity = _capacity(device)
    name = "each GPU" if cuda else "this machine's memory"
    if config.backend == "local":
        return Placement(name, 1, per_run, 0, capacity, "backend local: the runs one after another, in this process")
    if config.backend == "processes":
        runs = side_by_side(config.runs)[0]
        return Placement(name, runs, per_run, driver, capacity, f"backend processes: {runs} of the M = {config.runs} "
                         "runs side by side, beside the driver")  # fmt: skip
    if cuda and config.ray_num_gpus > 0:
        runs = min(config.runs, max(1, int(1 / config.ray_num_gpus)))
        return Placement(name, runs, per_run, 0, capacity, f"backend ray: ray_num_gpus {config.ray_num_gpus:g}, "
                         f"{runs} run(s) per GPU; the driver holds {driver / GIB:.2f} GiB where it runs")  # fmt: skip
    runs = min(config.runs, max(1, int((os.cpu_count() or 1) // config.ray_num_cpus)))
    return Placement(name, runs, per_run, driver, capacity, f"backend ray on this machine: {runs} run(s) at once "
                     f"(ray_num_cpus {config.ray_num_cpus:g}), beside the driver")  # fmt: skip


def _capacity(device: str) -> int | None:
    """This machine's memory (cpu) or its first GPU's (cuda), where it has one."""
    if device == "cuda":
        return torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@dataclass(frozen=True)
class Plan:
    """The memory of one run and of the device its iteration's runs share."""

    config: WarpConfig
    device: str
    shape: Shape
    run: RunMemory
    placement: Placement


def plan(config: WarpConfig) -> Plan:
    """The plan of `config`: shapes from the config files alone, nothing loaded or written."""
    device = plan_device(config)
    shape = model_shape(policy_config(config), config)
    reward = reward_params(config)
    run = run_memory(shape, config, reward, device)
    return Plan(config, device, shape, run, placement(config, device, run, shape, reward))


def plan_text(result: Plan) -> str:
    """The plan as the `plan` command prints it: the run's lines, each phase's peak, the device."""
    config, shape, run, place = result.config, result.shape, result.run, result.placement
    trains = f"LoRA r = {config.lora_r}: {shape.trainable / 1e6:.2f}M train" if config.lora_r else "all train"
    checkpointing = "on" if checkpoints_gradients(config, torch.device(result.device)) else "off"
    lines = [
        f"policy {config.policy}: {shape.params / 1e6:.2f}M parameters ({trains}); {result.device}, "
        f"{config.precision}, gradient checkpointing {checkpointing}; batch {config.batch_size} in micro-batches of "
        f"{micro_batch(config)}, at most {config.prompt_max_tokens} + {config.max_new_tokens} tokens",
        f"{'one run':<50}{'memory':>10}  {'when':<12}note",
        *(f"{line.what:<50}{size(line.bytes):>10}  {line.when:<12}{line.note}" for line in run.lines),
        *([f"{'of which LoRA adapters, their gradients, moments':<50}{size(4 * shape.adapters * FP32):>10}"]
          if config.lora_r else []),
        *(f"{'peak, ' + phase:<50}{size(peak):>10}" for phase, peak in run.phases.items()),
        f"{'peak of one run':<50}{size(run.peak):>10}  {run.peak_phase}",
        place.how,
        f"{place.device}: {place.runs} x {size(place.per_run)}"
        + (f" + driver {size(place.driver)}" if place.driver else "")
        + f" = {size(place.total)}" + _fits(place),
    ]  # fmt: skip
    return "\n".join(lines)


def size(count: int) -> str:
    """Bytes in the largest binary unit that leaves at least 1: 3.01 GiB, 12.5 MiB."""
    for unit, scale in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= scale:
            return f"{count / scale:.2f} {unit}"
    return f"{count} B"


def _fits(place: Placement) -> str:
    if place.capacity is None:
        return ""
    verdict = "fits" if place.total <= place.capacity else "does not fit"
    return f", of {size(place.capacity)}: {verdict}"
