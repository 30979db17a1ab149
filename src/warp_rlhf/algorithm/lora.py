"""LoRA (PEFT) under WARP: only the adapters train, and every weight-space operation of the paper
acts on the merged weights W' = W + (α/r)·B·A.

- A run's task vector is its merged ΔW = (α/r)·B·A for every adapted weight: its output
  (`merged_state`) holds the merged weights under the plain model's names, so SLERP and LITI
  (`merge`) never see A or B. Merging A and B separately would not merge the ΔW (SLERP of
  products is not the product of SLERPs, and LITI would scale ΔW by η²).
- The EMA anchor is a plain copy of the model, updated as (1 − μ)·anchor + μ·W' on the merged
  weights: the exact EMA of the policy, not EMA(A)·EMA(B), which is not an EMA of ΔW.
- A run starts from θ_init with fresh adapters: B = 0, so W' = θ_init, and A drawn from a seed of
  the run (`reset_adapters`), so a resumed or re-run run draws the same A.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch

from warp_rlhf.algorithm.merge import State, model_state
from warp_rlhf.config import WarpConfig
from warp_rlhf.errors import ConfigError
from warp_rlhf.policy import drawing_from, forked_rng

ADAPTER = "default"


def require_peft():
    try:
        import peft
    except ImportError:
        raise ConfigError("lora_r > 0 needs PEFT: pip install 'warp-rlhf[lora]'") from None
    return peft


def device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def add_adapters(model: torch.nn.Module, config: WarpConfig) -> torch.nn.Module:
    """LoRA adapters of rank `lora_r` injected in place into `model`'s target modules; only they train."""
    peft = require_peft()
    targets = config.lora_target_modules
    lora = peft.LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=targets[0] if targets == ["all-linear"] else targets,
        bias="none",
    )
    try:
        with forked_rng(device_of(model)):  # PEFT draws A from the global RNG; `reset_adapters` draws it anew
            peft.inject_adapter_in_model(lora, model)
    except ValueError as error:
        raise ConfigError(f"lora_target_modules={targets!r} do not fit the policy: {error}") from None
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(".lora_" in name)
    return model


def adapted(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The LoRA layers of `model`, by the name of the module they adapt."""
    return {
        name: module for name, module in model.named_modules() if hasattr(module, "lora_A") and ADAPTER in module.lora_A
    }


def merged_weight(module: torch.nn.Module) -> torch.Tensor:
    """W + ΔW of one LoRA layer, ΔW = (α/r)·B·A laid out as W is (PEFT's `get_delta_weight`: a
    GPT-2 Conv1D stores W transposed)."""
    weight = module.base_layer.weight
    return weight + module.get_delta_weight(ADAPTER).to(weight.dtype)


def plain_name(name: str) -> str:
    """A tensor's name in the model without adapters: `….q_proj.base_layer.weight` → `….q_proj.weight`."""
    return name.replace(".base_layer.", ".")


@torch.no_grad()
def merged_state(model: torch.nn.Module) -> State:
    """The model's float tensors as the plain model names them, each adapted weight merged:
    W + (α/r)·B·A. A model without adapters gives its `model_state` (views, not copies)."""
    layers = adapted(model)
    if not layers:
        return model_state(model)
    state: State = {}
    for name, tensor in model_state(model).items():
        if ".lora_" in name:
            continue
        state[plain_name(name)] = tensor
    for name, module in layers.items():
        state[f"{name}.weight"] = merged_weight(module)
    return state


@torch.no_grad()
def load_base(model: torch.nn.Module, state: State) -> None:
    """Write a plain model's `state` into the base weights of `model` (adapters untouched)."""
    targets = {plain_name(name): tensor for name, tensor in model_state(model).items() if ".lora_" not in name}
    if targets.keys() != state.keys():
        missing = sorted(targets.keys() - state.keys())[:3]
        raise KeyError(f"state does not match the model's base weights (missing {missing})")
    torch._foreach_copy_([targets[name] for name in targets], [state[name] for name in targets])


@torch.no_grad()
def reset_adapters(model: torch.nn.Module, seed: int) -> None:
    """Fresh adapters: B = 0 (so the merged weights are the base ones) and A as PEFT draws it,
    from `seed`."""
    with drawing_from(torch.Generator(device_of(model)).manual_seed(seed)):
        for module in adapted(model).values():
            module.reset_lora_parameters(ADAPTER, True)


@contextlib.contextmanager
def adapter_dropout(model: torch.nn.Module) -> Iterator[None]:
    """LoRA's dropout on in the training forward only; sampling and the anchor's forward never drop.
    Its masks come from the global RNG: the trainer sets that to the step's generator around it."""
    dropouts = [m for name, m in model.named_modules() if name.endswith(f"lora_dropout.{ADAPTER}")]
    for module in dropouts:
        module.train()
    try:
        yield
    finally:
        for module in dropouts:
            module.eval()


def adapter_of(final: State, sft: State, model: torch.nn.Module, config: WarpConfig):
    """A PEFT LoRA adapter on θ_sft whose update is `final` − θ_sft on every adapted weight (the
    other tensors must be unchanged), from a truncated SVD of that change.

    The change is a sum of the I·M runs' rank-r updates (SLERP and LITI are linear combinations),
    so its rank is at most I·M·r: truncating there keeps all of it but the fp32 rounding of
    `final` − θ_sft, which would otherwise look full-rank. `model` is a plain copy of the policy;
    it comes back with the adapter in it, ready for `save_pretrained`."""
    peft = require_peft()
    layers = adapted(add_adapters(copy.deepcopy(model), config))
    most = config.iterations * config.runs * config.lora_r
    factors, ranks = {}, {}
    for name, module in layers.items():
        change = final[f"{name}.weight"].double() - sft[f"{name}.weight"].double()
        if module.fan_in_fan_out:  # PEFT's B·A is (out, in); a Conv1D stores the weight (in, out)
            change = change.T
        u, s, v = torch.linalg.svd(change, full_matrices=False)
        rank = max(1, min(most, int((s > 1e-12 * max(float(s[0]), 1e-300)).sum())))
        factors[name] = ((u[:, :rank] * s[:rank]).float(), v[:rank].float())
        ranks[name] = rank
    top = max(ranks.values())
    lora = peft.LoraConfig(
        r=top, lora_alpha=top, target_modules=list(layers), rank_pattern=ranks, alpha_pattern=ranks, bias="none",
        fan_in_fan_out=any(module.fan_in_fan_out for module in layers.values()),
    )  # fmt: skip
    with forked_rng(device_of(model)):  # PEFT draws A, which the factors below replace
        peft_model = peft.get_peft_model(model, lora)
    with torch.no_grad():
        for name, module in adapted(peft_model).items():
            b, a = factors[name.removeprefix("base_model.model.")]
            module.lora_B[ADAPTER].weight.copy_(b)
            module.lora_A[ADAPTER].weight.copy_(a)
    return peft_model
