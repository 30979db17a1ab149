"""report.md: results tables, embedded plots, the resolved config, seconds per stage, and one
sample completion per policy for the same prompt."""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path

from warp_rlhf.checkpoint import read_json, write_json, write_text

TIMINGS_FILE = "timings.json"


@contextmanager
def timed(out: Path, stage: str):
    """Add the seconds spent in the block to `stage` in out/timings.json."""
    started = time.perf_counter()
    try:
        yield
    finally:
        path = out / TIMINGS_FILE
        timings = read_json(path) if path.exists() else {}
        timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - started
        write_json(path, timings)


def _cell(row: dict, metric: str) -> str:
    return f"{row[metric + '_mean']:.3f} ± {row[metric + '_se']:.3f}"


def results_markdown(policies: dict) -> str:
    header = "| policy | reward | judge (VADER) | KL exact (nats) | KL k1 (nats) | length | distinct-1 | distinct-2 |"
    lines = [header, "|---|---|---|---|---|---|---|---|"]
    for name, row in policies.items():
        cells = [_cell(row, m) for m in ("reward", "judge", "kl_exact", "kl_k1")]
        extra = f"{row['length_mean']:.1f} | {row['distinct_1']:.3f} | {row['distinct_2']:.3f}"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {extra} |")
    return "\n".join(lines)


def _order(policies: dict) -> dict:
    """SFT, the front by ν, WARP iterations, then the baseline by step."""
    rank = {"sft": 0, "liti": 1, "iteration": 2, "reinforce": 3}

    def key(item):
        name, row = item
        return rank[row["kind"]], row.get("nu", 0.0), row.get("iteration", 0), row.get("step", 0), name

    return dict(sorted(policies.items(), key=key))


def sample_completions(eval_dir: Path, policies: dict) -> str:
    """The completion of every policy for the first held-out prompt."""
    rows = [json.loads(line) for line in (eval_dir / "completions.jsonl").read_text().splitlines()]
    if not rows:
        return ""
    prompt = rows[0]["prompt"]
    first = {row["policy"]: row for row in rows if row["prompt"] == prompt}
    lines = [f"Prompt: `{prompt}`", "", "| policy | completion | reward | judge |", "|---|---|---|---|"]
    for name in policies:
        if name in first:
            text = first[name]["completion"].replace("|", "\\|").replace("\n", " ")
            lines.append(f"| {name} | {text} | {first[name]['reward']:.2f} | {first[name]['judge']:.2f} |")
    return "\n".join(lines)


def write_report(out: Path, config_text: str, results: dict, extra_sections: str = "") -> Path:
    """Write out/report.md from eval/ and timings.json."""
    policies = _order(results["policies"])
    timings_path = out / TIMINGS_FILE
    timings = read_json(timings_path) if timings_path.exists() else {}
    timing_lines = "\n".join(f"| {stage} | {seconds:.0f} |" for stage, seconds in timings.items())
    plots = [p for p in ("reward_vs_kl.png", "judge_vs_kl.png", "training_curves.png") if (out / "eval" / p).exists()]
    figures = "\n\n".join(f"![{p[:-4]}](eval/{p})" for p in plots)
    reward_metrics = out / "reward_model" / "metrics.json"
    accuracy = read_json(reward_metrics)["eval_pairwise_accuracy"] if reward_metrics.exists() else float("nan")
    text = f"""# warp-rlhf report

Reward model: held-out pairwise accuracy {accuracy:.3f}.
Policies sampled on the same {next(iter(policies.values()))["n_prompts"]} held-out prompts with the same
seeds; mean ± standard error over prompts. KL is KL(π ‖ π_sft) per sequence; plots use the
exact-per-token estimator.

## Results

{results_markdown(policies)}

## Plots

{figures}

## One prompt, every policy

{sample_completions(out / "eval", policies)}
{extra_sections}
## Seconds per stage

| stage | seconds |
|---|---|
{timing_lines}

## Resolved config

```yaml
{config_text}```
"""
    write_text(out / "report.md", text)
    return out / "report.md"
