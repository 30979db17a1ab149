"""`warp-rlhf experiment --config experiments/paper.yaml`: do the paper's claims hold here?

The claims (Ramé et al., 2024, §4–5), each answered as reward differences at matched KL with
standard errors (`compare`), every policy sampled on the same held-out prompts with the same seeds:

1. `ema_anchor`: REINFORCE with an EMA anchor against the SFT anchor, same steps;
2. `slerp_vs_lerp`: the same M runs merged by SLERP against LERP;
3. `warp_vs_reinforce`: WARP's LITI front against the REINFORCE trajectory at equal compute (I·M·T
   steps), for each seed;
4. `iterations`: the front of iteration I against that of iteration 1;
5. `more_runs`: SLERP of more runs (M = 1 … `claim_5_runs`) of the same iteration.

Arms, each an output folder under `output_dir` that shares the reward model and data splits of
`output_dir/shared`: `warp_seed<s>` (WARP and its baseline, `train_seed` s), `reinforce_ema` (the
baseline with an EMA anchor), `more_runs` (iteration 1 with more runs; the first M are
`warp_seed<s0>`'s, linked, not retrained). Every piece is reused when done, so an interrupted
experiment resumes where it stopped. Results go to `report_dir`: results.json, one figure per claim,
and the claims table (also written into `claims_doc` between its markers).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from warp_rlhf.algorithm.baseline import trajectory_files  # noqa: E402
from warp_rlhf.algorithm.merge import State, lerp, merge_task_vectors  # noqa: E402
from warp_rlhf.algorithm.warp import run_tensors  # noqa: E402
from warp_rlhf.checkpoint import load_tensors, read_json, write_json, write_text  # noqa: E402
from warp_rlhf.config import FIELDS, WarpConfig, read_yaml, unknown_field, validate  # noqa: E402
from warp_rlhf.errors import ConfigError  # noqa: E402
from warp_rlhf.layout import OutputDir  # noqa: E402
from warp_rlhf.stages.compare import Point, compare, paired_difference, point_of, verdict  # noqa: E402
from warp_rlhf.stages.pipeline import evaluate_points, load_splits, prepare_output, reward_stage, train_stage  # noqa: E402
from warp_rlhf.stages.plots import KL_LABEL, save_figure  # noqa: E402
from warp_rlhf.stages.report import timed  # noqa: E402
from warp_rlhf.stages.sweep import share_data  # noqa: E402

TABLE_BEGIN, TABLE_END = "<!-- claims table: written by warp-rlhf experiment -->", "<!-- end of claims table -->"


@dataclasses.dataclass
class Experiment:
    """What `experiments/*.yaml` holds."""

    config: WarpConfig  # the shared setting; its output_dir is the experiment's folder
    seeds: list[int]  # train_seed of each repetition of claim 3
    nu: list[float]  # the LITI front's points (1 − ν) θ_sft + ν θ, ν > 0
    claim_5_runs: int  # the most runs merged for claim 5
    report_dir: Path
    claims_doc: Path | None

    @classmethod
    def load(cls, path: str | Path) -> Experiment:
        data = read_yaml(path)
        known = {"config", "seeds", "nu", "claim_5_runs", "report_dir", "claims_doc"}
        for key in data:
            if key not in known:
                raise ConfigError(f"experiment file {path}: unknown key '{key}' (keys: {', '.join(sorted(known))})")
        fields = data.get("config") or {}
        for name in fields:
            if name not in FIELDS:
                raise unknown_field(name)
        config = WarpConfig(**fields)
        seeds, nu = list(data.get("seeds", [0, 1])), sorted(float(v) for v in data.get("nu", [0.5, 1.0]))
        if len(seeds) < 1 or not all(0 < v <= 1 for v in nu) or 1.0 not in nu:
            raise ConfigError(f"experiment file {path}: seeds must be a non-empty list and nu values in (0, 1] with 1")
        runs = int(data.get("claim_5_runs", config.runs + 2))
        if config.iterations < 2 or config.runs < 2 or runs <= config.runs:
            raise ConfigError(
                f"experiment file {path}: the claims need iterations >= 2 and runs >= 2 (claims 4 and 2), and "
                f"claim_5_runs ({runs}) above runs ({config.runs})"
            )
        doc = data.get("claims_doc")
        report = Path(data.get("report_dir", "docs/paper-claims"))
        experiment = cls(config, seeds, nu, runs, report, Path(doc) if doc else None)
        experiment.arms()  # every arm's config is checked now, before any work
        return experiment

    @property
    def root(self) -> OutputDir:
        return OutputDir(Path(self.config.output_dir))

    def arm(self, name: str, **changes: Any) -> WarpConfig:
        config = dataclasses.replace(self.config, output_dir=str(self.root.root / name), **changes)
        validate(config)
        return config

    def arms(self) -> dict[str, WarpConfig]:
        """The arms' configs: `warp_seed<s>` (WARP and its baseline), `reinforce_ema`, `more_runs`."""
        first = self.seeds[0]
        arms = {f"warp_seed{s}": self.arm(f"warp_seed{s}", train_seed=s) for s in self.seeds}
        arms["reinforce_ema"] = self.arm("reinforce_ema", train_seed=first, baseline_anchor="ema")
        arms["more_runs"] = self.arm(
            "more_runs", train_seed=first, iterations=1, runs=self.claim_5_runs, slerp_lambda=None
        )
        return arms


def run_experiment(experiment: Experiment) -> dict:
    """Train every arm, evaluate every policy the claims need, compare, write the report."""
    shared = experiment.arm("shared")
    shared_out = prepare_output(shared)
    reward_stage(shared, shared_out)
    load_splits(shared, shared_out)
    first, arms = experiment.seeds[0], experiment.arms()
    for name, config in arms.items():
        out = prepare_output(config)
        share_data(shared_out, out)
        if name == "more_runs":
            _link_runs(OutputDir(Path(arms[f"warp_seed{first}"].output_dir)), OutputDir(out), experiment.config.runs)
        if name != "reinforce_ema":
            train_stage(dataclasses.replace(config, method="warp"), out, resume=True)
        if name.startswith("warp_seed") or name == "reinforce_ema":
            train_stage(dataclasses.replace(config, method="reinforce"), out, resume=True)
    curves = _curves(experiment, arms)
    with timed(experiment.root.root, "evaluate"):
        evaluated = evaluate_points(shared, shared_out, lambda sft: _points(curves, sft), experiment.root)
    arms_and_shared = [OutputDir(Path(c.output_dir)) for c in [experiment.arm("shared"), *arms.values()]]
    seconds = sum(sum(read_json(arm.timings).values()) for arm in arms_and_shared if arm.timings.exists())
    seconds += read_json(experiment.root.timings)["evaluate"]
    results = _results(experiment, curves, evaluated, seconds)
    write_report(experiment, results)
    return results


def _link_runs(source: OutputDir, target: OutputDir, runs: int) -> None:
    """The first `runs` runs of iteration 1 of `source`, as runs of `target` (the same seeds: a
    run's randomness depends on its train_seed, iteration and number, not on M)."""
    target.iteration(1).mkdir(parents=True, exist_ok=True)
    for m in range(1, runs + 1):
        link = target.run(1, m).path
        if not link.exists():
            link.symlink_to(source.run(1, m).path.resolve(), target_is_directory=True)


Weights = Callable[[State], Callable[[], State]]
"""Given θ_sft, a function that builds a policy's weights when it is evaluated."""


def _front(name: str, weights: Callable[[], State], nu: list[float]) -> list[tuple[str, float, Weights]]:
    """The LITI front (1 − ν) θ_sft + ν θ of a policy θ: (name, ν, weights) for each ν > 0."""

    def at(v: float) -> Weights:
        def build(sft: State) -> Callable[[], State]:
            def weights_at() -> State:
                theta = weights()
                return {k: lerp(sft[k], theta[k], v) for k in sft}

            return weights_at

        return build

    return [(f"{name}_nu{v:g}", v, at(v)) for v in nu]


def _file(path: Path) -> Weights:
    return lambda sft: lambda: load_tensors(path)


def _merge(folder: OutputDir, runs: int, method: str, weight: float | None) -> Callable[[], State]:
    """θ_init + SLERP (or LERP) of iteration 1's first `runs` runs of `folder`, with λ `weight`."""

    def weights() -> State:
        load = run_tensors([folder.run(1, m) for m in range(1, runs + 1)])
        return merge_task_vectors(load_tensors(folder.init(1)), load, runs, weight, method)

    return weights


def _curves(experiment: Experiment, arms: dict[str, WarpConfig]) -> dict[str, list[tuple[str, float, Weights]]]:
    """Every curve the claims compare: name → its points (name, x, weights); x is ν on a front and
    the step on a trajectory. Each starts at the SFT policy."""
    nu, first = experiment.nu, experiment.seeds[0]
    curves: dict[str, list[tuple[str, float, Weights]]] = {}
    for s in experiment.seeds:
        config = arms[f"warp_seed{s}"]
        out = OutputDir(Path(config.output_dir))
        final = out.slerp(config.iterations)
        curves[f"warp_seed{s}"] = _front(f"warp_seed{s}", lambda p=final: load_tensors(p), nu)
        curves[f"reinforce_seed{s}"] = [
            (f"reinforce_seed{s}_step{k}", k, _file(path)) for k, path in trajectory_files(config, out.baseline)
        ]
    out = OutputDir(Path(arms[f"warp_seed{first}"].output_dir))
    curves["iteration_1"] = _front("iteration_1", lambda: load_tensors(out.slerp(1)), nu)
    weight = experiment.config.slerp_lambda  # the λ iteration 1 was merged with
    curves["lerp_iteration_1"] = _front("lerp_iteration_1", _merge(out, experiment.config.runs, "lerp", weight), nu)
    ema = arms["reinforce_ema"]
    ema_out = OutputDir(Path(ema.output_dir))
    curves["reinforce_ema"] = [
        (f"reinforce_ema_step{k}", k, _file(path)) for k, path in trajectory_files(ema, ema_out.baseline)
    ]
    more = OutputDir(Path(arms["more_runs"].output_dir))
    for m in range(1, experiment.claim_5_runs + 1):
        if m != experiment.config.runs:  # M = runs is iteration_1 itself
            curves[f"runs_{m}"] = _front(f"runs_{m}", _merge(more, m, "slerp", None), nu)
    return curves


def _points(curves: dict, sft: State) -> list[tuple[str, dict, Callable[[], State]]]:
    points = [("sft", {"kind": "sft"}, lambda: sft)]
    for curve, members in curves.items():
        points += [(name, {"kind": "experiment", "curve": curve, "x": x}, build(sft)) for name, x, build in members]
    return points


CLAIMS = [
    ("ema_anchor", "An EMA anchor gives a better reward–KL trade-off than the SFT anchor.",
     "reinforce_ema", "reinforce_seed{first}", "REINFORCE, EMA anchor", "REINFORCE, SFT anchor"),
    ("slerp_vs_lerp", "Merging runs by SLERP of task vectors gives more reward than LERP, at some cost in KL.",
     "iteration_1", "lerp_iteration_1", "SLERP of M runs (front)", "LERP of the same runs (front)"),
    ("warp_vs_reinforce", "WARP's LITI front lies above the REINFORCE trajectory at equal compute.",
     "warp_seed{seed}", "reinforce_seed{seed}", "WARP LITI front", "REINFORCE trajectory"),
    ("iterations", "Each iteration, starting from the previous LITI point, lifts the front.",
     "warp_seed{first}", "iteration_1", "front of iteration I", "front of iteration 1"),
    ("more_runs", "Merging more runs M gives a better merged policy.",
     "runs_{most}", "runs_1", "SLERP of the most runs (front)", "one run (front)"),
]  # fmt: skip
"""(key, the paper's claim, curve A, curve B, labels): each claim says A lies above B."""


def _results(experiment: Experiment, curves: dict, evaluated: dict, seconds: float) -> dict:
    sft = point_of(evaluated["sft"][1])

    def curve(name: str) -> list[Point]:
        return [sft] + [point_of(evaluated[member][1]) for member, _, _ in curves[name]]

    first, most = experiment.seeds[0], experiment.claim_5_runs
    claims = []
    for key, statement, a, b, label_a, label_b in CLAIMS:
        seeds = experiment.seeds if key == "warp_vs_reinforce" else [first]
        for seed in seeds:
            pair = [c.format(first=first, seed=seed, most=most) for c in (a, b)]
            differences = compare(curve(pair[0]), curve(pair[1]))
            ends = [evaluated[curves[name][-1][0]][1] for name in pair]  # ν = 1, or the trajectory's last step
            (reward, reward_se), (kl, kl_se) = (
                paired_difference(*(getattr(s, m) for s in ends)) for m in ("reward", "kl_exact")
            )
            claims.append({
                "endpoints": {"a": curves[pair[0]][-1][0], "b": curves[pair[1]][-1][0], "reward_difference": reward,
                              "reward_se": reward_se, "kl_difference": kl, "kl_se": kl_se},
                "claim": key, "statement": statement, "seed": seed, "a": pair[0], "b": pair[1],
                "label_a": label_a, "label_b": label_b, "verdict": verdict(differences),
                "differences": [{"kl": d.kl, "difference": d.difference, "se": d.se, "z": d.z} for d in differences],
            })  # fmt: skip
    policies = {name: {**samples.summary(), **meta} for name, (meta, samples) in evaluated.items()}
    config = experiment.config
    budget = {
        "iterations": config.iterations, "runs": config.runs, "steps": config.steps, "batch_size": config.batch_size,
        "learning_rate": config.learning_rate, "eval_prompts": len(evaluated["sft"][1].prompts),
        "seeds": experiment.seeds, "claim_5_runs": most, "nu": experiment.nu, "seconds": round(seconds),
    }  # fmt: skip
    return {
        "budget": budget,
        "claims": claims,
        "policies": policies,
        "curves": {n: [m[0] for m in c] for n, c in curves.items()},
    }


def write_report(experiment: Experiment, results: dict) -> None:
    """results.json, a figure per claim, the claims table (into `claims_doc` between its markers)."""
    folder = experiment.report_dir
    write_json(folder / "results.json", results)
    for key, *_ in CLAIMS:
        _figure(results, key, folder / f"{key}.png")
    table = claims_table(results)
    write_text(folder / "claims.md", table)
    if experiment.claims_doc is not None and experiment.claims_doc.exists():
        text = experiment.claims_doc.read_text()
        if TABLE_BEGIN in text and TABLE_END in text:
            head, rest = text.split(TABLE_BEGIN, 1)
            write_text(
                experiment.claims_doc, head + TABLE_BEGIN + "\n" + table + TABLE_END + rest.split(TABLE_END, 1)[1]
            )


def claims_table(results: dict) -> str:
    """One row per claim (and seed): A − B at each matched KL, ± s.e., the verdict, and A − B
    between the curves' last points (paired over prompts: reward, and KL in nats)."""
    lines = [
        "| claim | seed | A − B at matched KL (nats): reward difference ± s.e. | verdict "
        "| A − B at their ends: reward; KL |",
        "|---|---|---|---|---|",
    ]
    for claim in results["claims"]:
        cells = "; ".join(f"KL {d['kl']:.2f}: {d['difference']:+.3f} ± {d['se']:.3f}" for d in claim["differences"])
        e = claim["endpoints"]
        ends = f"{e['reward_difference']:+.3f} ± {e['reward_se']:.3f}; {e['kl_difference']:+.2f} ± {e['kl_se']:.2f}"
        name = f"{claim['claim']} ({claim['label_a']} − {claim['label_b']})"
        lines.append(f"| {name} | {claim['seed']} | {cells} | {claim['verdict']} | {ends} |")
    return "\n".join(lines) + "\n"


def _figure(results: dict, key: str, path: Path) -> None:
    """Reward against KL with error bars for the curves a claim compares (every seed's)."""
    policies, curves = results["policies"], results["curves"]
    figure, axes = plt.subplots(figsize=(6.4, 4.6))
    sft = policies["sft"]
    drawn = set()
    for claim in (c for c in results["claims"] if c["claim"] == key):
        for curve, label in ((claim["a"], claim["label_a"]), (claim["b"], claim["label_b"])):
            if curve in drawn:
                continue
            drawn.add(curve)
            rows = [sft] + [policies[name] for name in curves[curve]]
            axes.errorbar(
                [r["kl_exact_mean"] for r in rows], [r["reward_mean"] for r in rows],
                xerr=[r["kl_exact_se"] for r in rows], yerr=[r["reward_se"] for r in rows],
                fmt="-o", capsize=3, label=f"{label} ({curve})",
            )  # fmt: skip
    axes.set_xlabel(KL_LABEL)
    axes.set_ylabel("mean reward")
    axes.set_title(key.replace("_", " "))
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7)
    save_figure(figure, path)
