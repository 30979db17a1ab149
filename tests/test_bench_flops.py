"""The benchmark's model-FLOPs count (benchmarks/run.py), against hand computation."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from transformers import AutoModelForSequenceClassification

_spec = importlib.util.spec_from_file_location("bench", Path(__file__).parents[1] / "benchmarks" / "run.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_phase_flops_by_hand():
    # 10 weights, 4 of them the (tied) output layer; 20 real tokens, 8 of them completion tokens
    flops = bench.phase_flops(n_params=10, n_output=4, tokens=20, completion_tokens=8, reward=5.0)
    forward = 2 * (6 * 20 + 4 * 8)  # body on every token, output layer where a completion token is predicted
    assert flops == {
        "generate": 2 * (6 * (20 - bench.BATCH) + 4 * 8),  # the last token of each row is never fed
        "reward": 5.0,
        "anchor": forward,
        "policy": 3 * forward,  # forward + backward (twice the forward)
    }


def test_forward_flops_leaves_out_the_embedding_lookup(tiny_backbone):
    model = AutoModelForSequenceClassification.from_pretrained(tiny_backbone, num_labels=1)
    lookup = model.get_input_embeddings().weight.numel()
    total = sum(p.numel() for p in model.parameters())
    assert 0 < lookup < total
    assert bench._forward_flops(model, tokens=7) == 2.0 * (total - lookup) * 7
