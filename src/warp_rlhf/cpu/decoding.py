"""The decode loop's forward: one new token per row through the KV cache.

`ModelDecoder` runs the model's own forward. On CPU fp32, Llama-architecture models (Llama,
SmolLM, Mistral, Qwen2: RMSNorm, rotary embeddings, grouped-query attention, a gated SiLU MLP)
take `LlamaDecoder` instead: the same layers in about 15 tensor operations each, where one
decode step of transformers' forward dispatches about 130 (masks, cache objects, views,
`rotate_half`, `repeat_kv`). At a few rows every operation of a decode step is small, so their
count is what costs (benchmarks/NOTES.md). `LlamaDecoder`
- keeps each layer's keys and values in buffers of P + L positions, filled from the prefill's
  cache, instead of growing them with `cat` every step;
- attends with the query heads that share a key/value head as query rows of one SDPA call over
  that head (no repeated keys and values);
- adds the residuals, applies SiLU and multiplies gate ⊙ up inside the oneDNN products
  (post-operations of `_linear_pointwise`), on the weights that `gemm.onednn_linears` packed;
- takes cos and sin from the model's own rotary module, once for every position.

A probe checks two of its steps against the model's own, once per model (`decodes_exactly`);
a model that fails it decodes with `ModelDecoder`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from warp_rlhf.cpu.gemm import onednn_linears, runs_on_onednn
from warp_rlhf.cpu.packing import position_ids, prefill
from warp_rlhf.cpu.probes import verdict

ARCHITECTURES = {"llama", "mistral", "qwen2"}
"""`model_type`s whose decoder layers `LlamaDecoder` writes out (the probe still checks each model)."""


class ModelDecoder:
    """Decode steps through the model's own forward and its `DynamicCache`."""

    def __init__(self, model, cache, prompt_mask: torch.Tensor):
        self.model, self.cache, self.mask = model, cache, prompt_mask
        self.positions = position_ids(prompt_mask)[:, -1:]

    def __call__(self, token: torch.Tensor) -> torch.Tensor:
        """Logits (B, V) after feeding `token` (B,) to every row."""
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(token), 1)], dim=1)
        self.positions = self.positions + 1
        output = self.model(input_ids=token[:, None], attention_mask=self.mask, position_ids=self.positions,
                            cache=self.cache, use_cache=True, logits_to_keep=1)  # fmt: skip
        return output.logits[:, -1]


class LlamaDecoder:
    """Decode steps of a Llama-architecture model, written out on oneDNN products (module docstring)."""

    def __init__(self, model, weights: dict, cache, prompt_mask: torch.Tensor, max_new_tokens: int):
        config, body = model.config, model.base_model
        rows, width = prompt_mask.shape
        capacity = width + max_new_tokens
        self.model, self.weights, self.length = model, weights, width
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.layers = []
        for layer, cached in zip(body.layers, cache.layers, strict=True):
            keys = cached.keys.new_empty(*cached.keys.shape[:2], capacity, cached.keys.shape[-1])
            values = cached.values.new_empty(*cached.values.shape[:2], capacity, cached.values.shape[-1])
            keys[:, :, :width], values[:, :, :width] = cached.keys, cached.values
            self.layers.append((layer, keys, values))
        real = F.pad(prompt_mask.bool(), (0, max_new_tokens), value=True)
        self.mask = torch.zeros(rows, 1, 1, capacity).masked_fill_(~real[:, None, None], float("-inf"))
        cos, sin = body.rotary_emb(self.mask, torch.arange(capacity + 1)[None])  # self.mask: for dtype and device
        half = cos.shape[-1] // 2
        # rotate_half(t) · sin = flip(t's halves) · (−sin₁, sin₂)
        self.cos, self.sin = cos[0], torch.cat([-sin[0, :, :half], sin[0, :, half:]], dim=-1)
        self.positions = position_ids(prompt_mask)[:, -1]

    def __call__(self, token: torch.Tensor) -> torch.Tensor:
        """Logits (B, V) after feeding `token` (B,) to every row."""
        rows, n = len(token), self.length
        self.positions = self.positions + 1
        cos, sin = self.cos[self.positions].unsqueeze(1), self.sin[self.positions].unsqueeze(1)
        mask = self.mask[..., : n + 1]
        x = self.model.get_input_embeddings()(token)
        for layer, keys, values in self.layers:
            attention, mlp = layer.self_attn, layer.mlp
            h = rms_norm(x, layer.input_layernorm)
            queries = rotate(self.linear(h, attention.q_proj).view(rows, self.heads, -1), cos, sin)
            keys[:, :, n] = rotate(self.linear(h, attention.k_proj).view(rows, self.kv_heads, -1), cos, sin)
            values[:, :, n] = self.linear(h, attention.v_proj).view(rows, self.kv_heads, -1)
            grouped = queries.view(rows, self.kv_heads, self.heads // self.kv_heads, -1)
            attended = F.scaled_dot_product_attention(grouped, keys[:, :, : n + 1], values[:, :, : n + 1],
                                                      attn_mask=mask, scale=attention.scaling)  # fmt: skip
            x = self.linear(attended.reshape(rows, -1), attention.o_proj, add=x)
            h = rms_norm(x, layer.post_attention_layernorm)
            gated = self.linear(h, mlp.up_proj, multiply=self.linear(h, mlp.gate_proj, activation="swish"))
            x = self.linear(gated, mlp.down_proj, add=x)
        self.length = n + 1
        return self.linear(rms_norm(x, self.model.base_model.norm), self.model.get_output_embeddings())

    def linear(self, x, module, *, activation="none", add=None, multiply=None) -> torch.Tensor:
        """act(x Wᵀ + b), (x Wᵀ + b) + add or (x Wᵀ + b) ⊙ multiply, in one oneDNN call."""
        weight = self.weights[module]
        if add is not None or multiply is not None:
            other, operation = (add, "add") if add is not None else (multiply, "mul")
            return torch.ops.mkldnn._linear_pointwise.binary(x, other, weight, module.bias, operation)
        return torch.ops.mkldnn._linear_pointwise(x, weight, module.bias, activation, [], "")


def rms_norm(x: torch.Tensor, norm) -> torch.Tensor:
    """w ⊙ x / √(mean(x²) + ε), as the model's RMSNorm in fp32."""
    return norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon))


def rotate(t: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding t · cos + rotate_half(t) · sin, with sin's first half negated."""
    rows, heads, dim = t.shape
    return torch.addcmul(t * cos, t.view(rows, heads, 2, dim // 2).flip(-2).view(rows, heads, dim), signed_sin)


def decoder(model, weights: dict, cache, prompt_mask: torch.Tensor, max_new_tokens: int, *, lean: bool):
    """`LlamaDecoder` where `lean` (from `decodes_exactly`) and oneDNN holds the weights, else `ModelDecoder`."""
    if lean and weights:
        return LlamaDecoder(model, weights, cache, prompt_mask, max_new_tokens)
    return ModelDecoder(model, cache, prompt_mask)


def _written_out(model) -> list:
    """The projections `LlamaDecoder` multiplies with itself (one layer's: all layers are alike)."""
    layers = getattr(getattr(model, "base_model", None), "layers", None)
    if not layers:
        return [None]
    attention, mlp = layers[0].self_attn, layers[0].mlp
    names = ("q_proj", "k_proj", "v_proj", "o_proj")
    return [getattr(attention, n, None) for n in names] + [
        getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj")
    ]


def decodes_exactly(model) -> bool:
    """Whether `LlamaDecoder` gives the model's own logits: a CPU fp32 model of `ARCHITECTURES`
    with a static rotary embedding and full attention in every layer, whose two decode steps on a
    left-padded probe match the model's own (checked once per model).
    """
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    config = model.config
    rotary = getattr(getattr(model, "base_model", None), "rotary_emb", None)
    if not (
        all(isinstance(m, torch.nn.Linear) for m in _written_out(model))  # no adapter (LoRA) on them
        and runs_on_onednn(next(model.parameters()))
        and getattr(config, "model_type", None) in ARCHITECTURES
        and getattr(config, "hidden_act", None) == "silu"
        and getattr(rotary, "rope_type", "dynamic") not in {"dynamic", "longrope"}
        and all(type(layer) is DynamicLayer for layer in DynamicCache(config=config).layers)
    ):
        return False

    def pairs(probe):
        width = probe.prompt_length
        prompt_ids, prompt_mask = probe.input_ids[:, :width], probe.attention_mask[:, :width]
        with onednn_linears(model) as weights:
            cache, _ = prefill(model, prompt_ids, prompt_mask, packed=False)
            lean = LlamaDecoder(model, weights, cache, prompt_mask, max_new_tokens=2)  # copies the cache first
            own = ModelDecoder(model, cache, prompt_mask)
            return [(own(token), lean(token)) for token in probe.completion_ids[:, :2].T]

    return verdict(model, "decode", pairs)
