"""The benchmark's model-FLOPs count (benchmarks/run.py), against hand computation."""

from __future__ import annotations

from transformers import AutoModelForSequenceClassification

from tests.benchmarks import bench


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


def test_products_only_mfu_by_hand():
    # a 10 s step: generate 3, reward 1, anchor 2, policy 4; their products alone 2, 1.5, 3 s
    ours = {
        "phases": {"seconds": 10.0, "seconds_generate": 3.0, "seconds_reward": 1.0, "seconds_anchor": 2.0,
                   "seconds_policy": 4.0},
        "product_seconds": {"generate": 2.0, "anchor": 1.5, "policy": 3.0},
        "flops_per_step": 700.0,
    }  # fmt: skip
    # 10 − (3 − 2) − (2 − 1.5) − (4 − 3) = 7.5 s; 700 / 7.5 / 20
    assert bench.products_only_mfu(ours, peak=20.0) == 700.0 / 7.5 / 20.0


def test_product_seconds_times_each_phase(tiny_policy):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_policy)
    seconds = bench.product_seconds(model, tokens=40, completion_tokens=24, repeats=1)
    assert set(seconds) == {"generate", "anchor", "policy"}
    assert all(value > 0 for value in seconds.values())
    assert seconds["policy"] > seconds["anchor"]  # the forward's products and the backward's


def test_utilisation_adds_the_runs_side_by_side_and_takes_the_median_step():
    runs = [
        {"step_flops": [100.0, 200.0, 90.0], "step_seconds": [2.0, 4.0, 1.0]},  # 390 FLOPs in 7 s
        {"step_flops": [300.0, 300.0, 60.0], "step_seconds": [3.0, 6.0, 3.0]},  # 660 FLOPs in 12 s
    ]
    got = bench.utilisation(runs, peak=10.0)
    per_step = [(50.0 + 100.0) / 10.0, (50.0 + 50.0) / 10.0, (90.0 + 20.0) / 10.0]
    assert got["per_step"] == per_step
    assert got["median"] == 11.0  # the middle of 15, 10 and 11
    assert got["all_steps"] == (390.0 / 7.0 + 660.0 / 12.0) / 10.0


def test_runs_side_by_side_warm_up_longer_and_take_one_step_more():
    assert bench._steps_taken(5, run=None) == (1, 6)  # alone: one warm-up step, then the 5 measured
    assert bench._steps_taken(5, run=2) == (2, 8)  # beside others: two warm-up steps, 5 measured, one more
