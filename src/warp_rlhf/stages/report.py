"""report.md: results tables, embedded plots, the resolved config, seconds per stage, and one
sample completion per policy for the same prompt."""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path

import yaml

from warp_rlhf.checkpoint import read_json, write_json, write_text
from warp_rlhf.layout import OutputDir
from warp_rlhf.stages.data import read_splits
from warp_rlhf.stages.plots import cell, number, reward_metrics
from warp_rlhf.stages.reward import reward_details

UNMOVED_KL = 0.01
"""KL(π ‖ π_sft) per sequence, in nats, below which a trained policy is still the SFT policy."""
STEP_SIZE = ("learning_rate", "steps", "beta")
"""The fields that set how far a policy moves from the SFT policy (`steps`: T, per WARP run)."""


@contextmanager
def timed(out: Path, stage: str):
    """Add the seconds spent in the block to `stage` in out/timings.json."""
    started = time.perf_counter()
    try:
        yield
    finally:
        path = OutputDir(out).timings
        timings = read_json(path) if path.exists() else {}
        timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - started
        write_json(path, timings)


def results_markdown(policies: dict) -> str:
    each = reward_metrics(policies)
    judged = any("judge_mean" in row for row in policies.values())
    metrics = ["reward", *each, *(["judge"] if judged else []), "kl_exact", "kl_k1"]
    titles = ["reward (total)" if each else "reward", *each, *(["judge"] if judged else [])]
    header = (
        "| policy | " + " | ".join(titles) + " | KL exact (nats) | KL k1 (nats) | length | distinct-1 | distinct-2 |"
    )
    lines = [header, "|---" * (len(metrics) + 4) + "|"]
    for name, row in policies.items():
        cells = [cell(row, m) for m in metrics]
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
    shown = prompt.replace("\n", " ").replace("`", "'")
    lines = [f"Prompt: `{shown}`", "", "| policy | completion | reward | judge |", "|---|---|---|---|"]
    for name in policies:
        if name in first:
            text = first[name]["completion"].replace("|", "\\|").replace("\n", " ")
            judge = f"{first[name]['judge']:.2f}" if "judge" in first[name] else "—"
            lines.append(f"| {name} | {text} | {first[name]['reward']:.2f} | {judge} |")
    return "\n".join(lines)


def trained_ends(policies: dict) -> dict[str, dict]:
    """The trained policies' end points: WARP's θ_slerp^I (`warp`) and the baseline's last step."""
    ends = {name: row for name, row in policies.items() if name == "warp"}
    trajectory = sorted((row.get("step", 0), name) for name, row in policies.items() if row["kind"] == "reinforce")
    if trajectory:
        ends[trajectory[-1][1]] = policies[trajectory[-1][1]]
    return ends


def unmoved_note(policies: dict, settings: dict) -> str:
    """One line where a trained policy ended within `UNMOVED_KL` of the SFT policy, naming the
    fields that set the step size with their values (`settings`: the config); "" otherwise. Such a
    policy's reward is the SFT policy's, and a table of zeros alone would not say why."""
    still = {name: row["kl_exact_mean"] for name, row in trained_ends(policies).items()}
    still = {name: kl for name, kl in still.items() if kl < UNMOVED_KL}
    if not still:
        return ""
    kls = ", ".join(f"{name} {kl:.2g}" for name, kl in still.items())
    fields = ", ".join(f"{name}={settings[name]}" for name in STEP_SIZE if name in settings)
    return (
        f"Nothing moved: KL to the SFT policy is below {UNMOVED_KL} nats ({kls}), so the rewards are the SFT "
        f"policy's; the step size is set by {fields} (raise learning_rate or steps, or lower beta)."
    )


def data_usage(out: Path) -> str:
    """The splits of `out` in one line (`data.Splits.usage`), "" where there are none."""
    path = OutputDir(out).splits
    return f"Data: {read_splits(read_json(path)).usage()}." if path.exists() else ""


def matched_kl_markdown(matched: dict) -> str:
    """The table of `compare.front_against_trajectory`: reward differences at matched KL."""
    lines = [
        f"## {matched['a']} against {matched['b']} at matched KL",
        "",
        f"Reward of the first minus the second, each interpolated linearly in KL (exact estimator) between "
        f"its evaluated points, never extrapolated; standard errors by {matched['se']}. Verdict: "
        f"**{matched['verdict']}** (every difference ≥ 2 s.e. above 0: holds; one ≤ −2 s.e.: does not hold).",
        "",
        "| KL (nats) | reward difference | s.e. | z |",
        "|---|---|---|---|",
    ]
    for d in matched["differences"]:
        lines.append(f"| {number(d['kl'])} | {d['difference']:+.3f} | {d['se']:.3f} | {d['z']:+.1f} |")
    return "\n".join(lines) + "\n"


def write_report(out: Path, config_text: str, results: dict, extra_sections: str = "") -> Path:
    """Write out/report.md from eval/ and timings.json."""
    policies = _order(results["policies"])
    if "matched_kl" in results:
        extra_sections = matched_kl_markdown(results["matched_kl"]) + extra_sections
    timings_path = OutputDir(out).timings
    timings = read_json(timings_path) if timings_path.exists() else {}
    timing_lines = "\n".join(f"| {stage} | {seconds:.0f} |" for stage, seconds in timings.items())
    figures_first = sorted(OutputDir(out).eval.glob("*.png"), key=lambda p: (p.name != "reward_vs_kl.png", p.name))
    plots = [p.name for p in figures_first]
    figures = "\n\n".join(f"![{p[:-4]}](eval/{p})" for p in plots)
    trained = OutputDir(out).reward_metrics
    reward = read_json(trained) if trained.exists() else None
    about_reward = (
        f"Reward model: held-out pairwise accuracy {reward['eval_pairwise_accuracy']:.3f}{reward_details(reward)}."
        if reward
        else ""
    )
    unmoved = unmoved_note(policies, yaml.safe_load(config_text) or {})
    unmoved = f"\n{unmoved}\n" if unmoved else ""
    text = f"""# warp-rlhf report

{about_reward}
{data_usage(out)}
Policies sampled on the same {next(iter(policies.values()))["n_prompts"]} held-out prompts with the same
seeds; mean ± standard error over prompts. KL is KL(π ‖ π_sft) per sequence; plots use the
exact-per-token estimator.

## Results

{results_markdown(policies)}
{unmoved}
## Plots

{figures}

## One prompt, every policy

{sample_completions(OutputDir(out).eval, policies)}
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
