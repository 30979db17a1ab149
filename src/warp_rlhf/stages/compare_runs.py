"""`warp-rlhf compare RUN_A RUN_B [RUN ...]`: evaluated output folders against one another at matched KL.

A run's curve is its WARP LITI front (the SFT point, then ν = … 1) where it has one, else its
REINFORCE trajectory (the SFT point, then its steps), read from the per-prompt values `evaluate`
left in eval/policies/. Runs pair only when they were evaluated on the same held-out prompts with
the same seed, from the same SFT policy scored by the same rewards: then a prompt's values move
together across runs, and A − B at matched KL gets the paired bootstrap of `compare`. Each run
after the first is compared with the first, under the verdict rule of docs/paper-claims.md (holds:
A − B ≥ 2 s.e. at every matched KL; does not hold: ≤ −2 s.e. at one; else inconclusive).

The runs are only read. Into the folder given: compare.json, compare.md and reward_vs_kl.png.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from warp_rlhf.checkpoint import read_json, write_json, write_text
from warp_rlhf.config import read_yaml
from warp_rlhf.errors import ConfigError
from warp_rlhf.layout import OutputDir
from warp_rlhf.stages.compare import compare, paired_difference, point_of, verdict
from warp_rlhf.stages.evaluate import Samples
from warp_rlhf.stages.plots import cell, curves_figure, save_figure
from warp_rlhf.stages.report import matched_kl_markdown

WRITTEN = ("compare.json", "compare.md", "reward_vs_kl.png")
"""What `compare` writes into its folder: the only files it writes over."""
CURVES = {"liti": ("WARP LITI front", "nu"), "reinforce": ("REINFORCE trajectory", "step")}
"""The kinds of evaluated policy a curve is made of, in order of preference: (its name, its order)."""


@dataclass
class Run:
    """An evaluated output folder: its evaluation seed and its curve, the SFT policy first."""

    folder: Path
    seed: int | None
    curve: str
    points: list[tuple[str, dict, Samples]]  # (name, results row's meta, per-prompt values)

    @property
    def label(self) -> str:
        return f"{self.folder} ({self.curve})"

    @property
    def sft(self) -> Samples:
        return self.points[0][2]


def load_run(folder: Path) -> Run:
    """The run in `folder`, from eval/policies/ and config.yaml; a folder that is not an evaluated
    run is one line saying what to do."""
    paths = OutputDir(folder)
    if not folder.is_dir():
        raise ConfigError(f"run {folder} does not exist")
    evaluated = {path.stem: read_json(path) for path in paths.evaluated_all()}
    if "sft" not in evaluated:
        raise ConfigError(
            f"run {folder} holds no evaluated policies (eval/policies/): "
            f"run `warp-rlhf evaluate --output_dir {folder} --resume` first"
        )
    seed = read_yaml(paths.config).get("seed") if paths.config.exists() else None
    for kind, (curve, order) in CURVES.items():
        along = sorted((e["meta"][order], name) for name, e in evaluated.items() if e["meta"]["kind"] == kind)
        if along:
            names = ["sft", *(name for _, name in along)]
            points = [(name, evaluated[name]["meta"], Samples(**evaluated[name]["samples"])) for name in names]
            return Run(folder, seed, curve, points)
    raise ConfigError(f"run {folder} holds no evaluated WARP front or REINFORCE trajectory, only the SFT policy")


def check_paired(a: Run, b: Run) -> None:
    """Refuse, in one line saying why, two runs whose evaluations do not pair prompt by prompt."""
    why = _unpaired(a, b)
    if why:
        raise ConfigError(f"{a.folder} and {b.folder} cannot be compared: {why}")


def _unpaired(a: Run, b: Run) -> str:
    """Why `a` and `b` do not pair, or "" where they do."""
    if len(a.sft.prompts) != len(b.sft.prompts):
        return f"they were evaluated on {len(a.sft.prompts)} and {len(b.sft.prompts)} held-out prompts"
    differ = next((i for i, (p, q) in enumerate(zip(a.sft.prompts, b.sft.prompts, strict=True)) if p != q), None)
    if differ is not None:
        return f"they were evaluated on other held-out prompts (prompt {differ + 1} differs: other data or seed)"
    if a.seed != b.seed:
        return f"they were evaluated with other seeds (seed {a.seed} and {b.seed}), so their samples do not pair"
    if a.sft.completions != b.sft.completions:
        return "their SFT policies wrote other completions (another policy, temperature or max_new_tokens)"
    if not all(math.isclose(x, y, rel_tol=1e-4, abs_tol=1e-5) for x, y in zip(a.sft.reward, b.sft.reward, strict=True)):
        return "they score the same SFT completions differently (another reward model, reward_funcs or reward_weights)"
    return ""


def compare_runs(folders: list[Path]) -> dict:
    """Each run after the first against the first at matched KL: the comparisons and every curve."""
    if len(folders) < 2:
        raise ConfigError("compare needs at least two evaluated output folders: warp-rlhf compare RUN_A RUN_B")
    runs = [load_run(folder) for folder in folders]
    first = runs[0]
    for other in runs[1:]:
        check_paired(first, other)
    return {
        "runs": {str(run.folder): run.curve for run in runs},
        "comparisons": [_comparison(first, other) for other in runs[1:]],
        "curves": {run.label: _rows(run) for run in runs},
        "seed": first.seed,
        "n_prompts": len(first.sft.prompts),
    }


def _rows(run: Run) -> list[dict]:
    """The curve's points as results rows (`evaluate.Samples.summary`), each with its policy's name."""
    return [{"policy": name, **meta, **samples.summary()} for name, meta, samples in run.points]


def _comparison(a: Run, b: Run) -> dict:
    """A − B at matched KL with its verdict, and A − B between the curves' ends, paired over prompts."""
    curves = [[point_of(samples) for _, _, samples in run.points] for run in (a, b)]
    try:
        differences = compare(*curves)
    except ValueError as error:  # the curves share no KL range
        raise ConfigError(f"{a.label} and {b.label} cannot be compared at matched KL: {error}") from None
    end_a, end_b = a.points[-1][2], b.points[-1][2]
    reward, reward_se = paired_difference(end_a.reward, end_b.reward)
    kl, kl_se = paired_difference(end_a.kl_exact, end_b.kl_exact)
    return {
        "a": a.label, "b": b.label, "verdict": verdict(differences), "se": "paired bootstrap over prompts",
        "differences": [{"kl": d.kl, "difference": d.difference, "se": d.se, "z": d.z} for d in differences],
        "endpoints": {"a": a.points[-1][0], "b": b.points[-1][0], "reward_difference": reward, "reward_se": reward_se,
                      "kl_difference": kl, "kl_se": kl_se},
    }  # fmt: skip


def claim_folder(folder: Path) -> None:
    """Refuse a folder holding anything `compare` did not write: it writes over its own files only."""
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"--output_dir {folder} is a file: choose a folder")
    foreign = sorted(p.name for p in folder.iterdir() if p.name not in WRITTEN) if folder.is_dir() else []
    if foreign:
        raise ConfigError(
            f"--output_dir {folder} holds files compare did not write ({', '.join(foreign[:3])}): choose another folder"
        )


def write_comparison(results: dict, folder: Path) -> None:
    """compare.json, compare.md (each curve's points, each comparison's table) and reward_vs_kl.png."""
    claim_folder(folder)
    write_json(folder / "compare.json", results)
    save_figure(curves_figure(results["curves"], "mean reward"), folder / "reward_vs_kl.png")
    write_text(folder / "compare.md", comparison_markdown(results))


def comparison_markdown(results: dict) -> str:
    """The curves' points and, for each comparison, A − B at matched KL and at the curves' ends."""
    lines = [
        "# Runs compared at matched KL",
        "",
        f"Every policy sampled on the same {results['n_prompts']} held-out prompts with seed {results['seed']}; "
        "mean ± standard error over prompts; KL(π ‖ π_sft) per sequence, exact-per-token estimator (nats).",
        "",
        "![reward against KL](reward_vs_kl.png)",
        "",
        "| run (curve) | policy | KL (nats) | reward |",
        "|---|---|---|---|",
    ]
    for label, rows in results["curves"].items():
        lines += [f"| {label} | {r['policy']} | {cell(r, 'kl_exact')} | {cell(r, 'reward')} |" for r in rows]
    for comparison in results["comparisons"]:
        e = comparison["endpoints"]
        lines += [
            "",
            matched_kl_markdown(comparison),
            f"At the curves' ends ({e['a']} − {e['b']}, paired over prompts): reward "
            f"{e['reward_difference']:+.3f} ± {e['reward_se']:.3f}, KL {e['kl_difference']:+.3f} ± {e['kl_se']:.3f}.",
        ]
    return "\n".join(lines) + "\n"
