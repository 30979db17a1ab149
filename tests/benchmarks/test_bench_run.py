"""What `make bench` runs, on the tiny models: the prompts handed to the measured processes, our
step measured alone, side by side, with LoRA and with gradient checkpointing (one step each), and
RESULTS.md rendered from those measurements and from the committed results."""

import copy
import json
import re

import pytest

from tests.benchmarks import BENCHMARKS, bench

STEPS = 1
PHASES = {"generate", "reward", "anchor", "policy"}
PEAK = {"fp32_matmul_flops": 1e11, "by_library": {"mkl": 1e11}}
"""A stand-in for `measure_peak`, whose 2048 × 2048 products are what it measures."""


def _tiny(patch: pytest.MonkeyPatch, tiny_policy, tiny_backbone, reviews_csv, prompts) -> None:
    """The benchmark's environment on the tiny models (`bench.CONFIG`), with its prompts file."""
    models = {"policy": str(tiny_policy), "reward_model": str(tiny_backbone), "dataset": str(reviews_csv)}
    patch.setenv(bench.CONFIG, json.dumps(models))
    patch.setenv(bench.PROMPTS, str(prompts))


@pytest.fixture(scope="module")
def measured(tiny_policy, tiny_backbone, reviews_csv, tmp_path_factory):
    """The prompts file and the measurements, taken in this process as `make bench` takes each in
    a process of its own."""
    prompts = tmp_path_factory.mktemp("bench") / "prompts.json"
    with pytest.MonkeyPatch.context() as patch:
        _tiny(patch, tiny_policy, tiny_backbone, reviews_csv, prompts)
        bench.write_prompts(prompts)
        results = {}
        bench.record(results, "peak", PEAK, beside=False)
        bench.record(results, "ours", [bench.measure_ours(STEPS, run) for run in (1, 2)], beside=True)
        bench.record(results, "ours", bench.measure_ours(STEPS), beside=False)
        bench.record(results, "lora", bench.measure_lora(STEPS), beside=False)
        bench.record(results, "checkpointing", bench.measure_checkpointing(STEPS), beside=False)
        bench.record(results, "merge", bench.measure_merge(), beside=False)
    return prompts, results


@pytest.mark.slow
def test_the_measured_processes_get_the_rl_prompts(measured):
    prompts, _ = measured
    texts = json.loads(prompts.read_text())
    assert len(texts) == bench._config().rl_prompts
    assert all(isinstance(text, str) and text for text in texts)


@pytest.mark.slow
def test_our_step_is_measured_alone_side_by_side_with_lora_and_with_checkpointing(measured):
    _, results = measured
    beside, alone, lora = results["ours_side_by_side"]["runs"], results["ours_alone"], results["lora_alone"]
    checkpointing = results["checkpointing_alone"]
    for result in (*beside, alone, lora, checkpointing):
        assert len(result["step_seconds"]) == len(result["step_flops"]) == STEPS
        assert result["seconds_per_step"] > 0 and result["peak_rss_bytes"] > 0
        assert set(result["flops_per_phase"]) == PHASES and all(v > 0 for v in result["flops_per_phase"].values())
    assert set(alone["product_seconds"]) == PHASES - {"reward"}  # timed alone only for the run alone
    assert beside[0]["product_seconds"] is None and lora["product_seconds"] is None
    assert checkpointing["product_seconds"] is None
    assert results["ours_side_by_side"]["samples_per_second"] == sum(r["samples_per_second"] for r in beside)


@pytest.mark.slow
def test_the_measurements_render_into_every_field_of_results_md(measured, tiny_policy, tiny_backbone, reviews_csv):
    results = copy.deepcopy(measured[1])
    trl = [{**run, "steps": STEPS} for run in results["ours_side_by_side"]["runs"]]  # `measure_trl`'s shape
    bench.record(results, "trl", trl, beside=True)
    with pytest.MonkeyPatch.context() as patch:  # the plan reads the same tiny models' configs
        _tiny(patch, tiny_policy, tiny_backbone, reviews_csv, measured[0])
        summary = bench.summarise(results)
    assert set(summary["plan_vs_rss"]) == set(bench.OUR_STEP) and all(v > 0 for v in summary["plan_vs_rss"].values())
    assert summary["checkpointing_rss_vs_full"] > 0 and summary["checkpointing_step_vs_full"] > 0
    text = bench.results_markdown(summary, STEPS)
    assert "$" not in text and "–" not in text.split("| `warp-rlhf plan`")[1].splitlines()[0]
    assert "the median of 1 step after warm-up" in text


@pytest.mark.slow
def test_a_measurement_runs_in_a_process_of_its_own(measured, tiny_policy, tiny_backbone, reviews_csv, monkeypatch):
    """As `make bench` starts it: `run.py --only lora`, its allocator set (`bench._start`), one JSON line back."""
    _tiny(monkeypatch, tiny_policy, tiny_backbone, reviews_csv, measured[0])
    result = bench._child("lora", STEPS)
    assert set(result) == set(measured[1]["lora_alone"])
    assert len(result["step_seconds"]) == STEPS


def test_the_template_names_exactly_the_fields_results_fields_makes():
    results = json.loads((BENCHMARKS / "results.json").read_text())
    named = set(re.findall(r"\$\{(\w+)\}", bench.TEMPLATE.read_text()))
    assert named == set(bench.results_fields(results, steps=5))
    assert "$" not in bench.TEMPLATE.read_text().replace("${", "")  # no other placeholder syntax


def test_results_md_is_the_template_rendered_from_the_committed_results():
    results = json.loads((BENCHMARKS / "results.json").read_text())
    steps = len(results["details"]["ours_alone"]["step_seconds"])
    assert (BENCHMARKS / "RESULTS.md").read_text() == bench.results_markdown(results, steps)
    assert f"the median of {steps} steps after warm-up" in (BENCHMARKS / "RESULTS.md").read_text()
