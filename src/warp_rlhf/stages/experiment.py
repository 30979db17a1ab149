"""`warp-rlhf experiment --config experiments/paper.yaml`: do the paper's claims hold here?

The claims (Ramé et al., 2024, §4–5), each answered as reward differences at matched KL with
standard errors (`compare`), every policy sampled on the same held-out prompts with the same seeds:

1. `ema_anchor`: REINFORCE with an EMA anchor against the SFT anchor, same steps;
2. `slerp_vs_lerp`: the same M runs merged by SLERP against LERP;
3. `warp_vs_reinforce`: WARP's LITI front against the REINFORCE trajectory at equal compute (I·M·T
   steps), for each seed, also across the whole shared KL range (the difference figure); and
   `warp_extrapolated_vs_reinforce` with the front extended past the merge (ν > 1);
4. `iterations`: the front of iteration I against that of iteration 1;
5. `more_runs`: SLERP of more runs (M = 1 … `claim_5_runs`) of the same iteration;

and, with `rloo`, `warp_vs_rloo_<reference>`: WARP's front against TRL's RLOOTrainer at equal
compute, for each seed. With two seeds or more, WARP, REINFORCE and RLOO are also compared as
means over their training seeds (`seed_level`).

Arms (`Arm`), each an output folder under `output_dir` that shares the reward model and data splits
of `output_dir/shared`: `warp_seed<s>` (WARP and its baseline, `train_seed` s), `reinforce_ema` (the
baseline with an EMA anchor), `more_runs` (iteration 1 with more runs; the first M are
`warp_seed<s0>`'s, linked, not retrained), `rloo_<reference>_seed<s>` (`rloo`). Every piece is
reused when done, so an interrupted experiment resumes where it stopped. Results go to
`report_dir` and nowhere else: results.json, the figures, and the claims table, claims.md.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from warp_rlhf.algorithm.baseline import total_steps, trajectory_files
from warp_rlhf.algorithm.merge import State, lerp, merge_task_vectors
from warp_rlhf.algorithm.warp import run_tensors
from warp_rlhf.checkpoint import load_tensors, read_json, write_json, write_text
from warp_rlhf.config import FIELDS, WarpConfig, read_yaml, unknown_field, validate
from warp_rlhf.errors import ConfigError
from warp_rlhf.layout import OutputDir
from warp_rlhf.stages.compare import Point, compare, overlap, paired_difference, point_of, verdict
from warp_rlhf.stages.pipeline import evaluate_points, load_splits, prepare_output, reward_stage, train_stage
from warp_rlhf.stages.plots import KL_LABEL, save_figure
from warp_rlhf.stages.report import timed
from warp_rlhf.stages.rloo import METRICS, VARIANTS, check_rloo, rloo_files, rloo_folder, train_rloo
from warp_rlhf.stages.seed_level import seed_level, seed_level_figure
from warp_rlhf.stages.sweep import share_data

KEYS = ("experiment", "config", "seeds", "nu", "claim_5_runs", "rloo", "keep_trajectories", "report_dir")
"""What an experiment file may hold."""

NU_MAX = 4.0
"""The largest ν of a front: past 1, θ_sft + ν (θ − θ_sft) extrapolates the merge (ExPO, Zheng et
al. 2024), at no training cost."""

NU_VALUES = f"a list of distinct numbers in (0, {NU_MAX:g}], 1 among them (past 1: extrapolation)"

EXTRAPOLATED = "warp_extrapolated_vs_reinforce"
"""Claim 3 with WARP's front extended past the merge (ν > 1): its figure is the difference figure."""

REFERENCES = {"ema": "EMA reference", "fixed": "fixed reference"}
"""The RLOO arms' KL references, as the claims name them."""

DIFFERENCE_CLAIMS = ("warp_vs_reinforce", EXTRAPOLATED)
"""The claims whose A − B is also drawn across the whole shared KL range."""

DIFFERENCE_POINTS = 21
"""KL values at which claim 3's A − B is drawn across the shared range (`difference_figure`)."""


@dataclasses.dataclass(frozen=True)
class Arm:
    """One output folder of the experiment and what is trained in it."""

    name: str
    config: WarpConfig
    warp: bool = True  # WARP's iterations
    reinforce: bool = True  # the REINFORCE baseline
    runs_from: str | None = None  # the arm whose runs of iteration 1 start this one's, linked, not retrained
    rloo: str | None = None  # TRL's RLOOTrainer with this reference (`rloo.VARIANTS`) instead

    @property
    def out(self) -> OutputDir:
        return OutputDir(Path(self.config.output_dir))

    @property
    def trajectory_name(self) -> str | None:
        """The name of the trajectory this arm trains (REINFORCE's or RLOO's), if any."""
        if self.rloo is not None:
            return self.name
        if not self.reinforce:
            return None
        return self.name.replace("warp_", "reinforce_") if self.warp else self.name


@dataclasses.dataclass(frozen=True)
class CurvePoint:
    """One policy of a curve: its name, its x (ν on a LITI front, the step on a trajectory), and
    `weights(θ_sft)`, which builds its weights when it is evaluated."""

    name: str
    x: float
    weights: Callable[[State], State]
    file: Path | None = None  # the checkpoint it is read from, where it is one


@dataclasses.dataclass(frozen=True)
class Curve:
    """A LITI front (`front`: x is ν) or a REINFORCE trajectory (x is the step); both start at the
    SFT policy, which is not among `points`. A front's points past ν = 1 extrapolate."""

    name: str
    points: tuple[CurvePoint, ...]
    front: bool = True

    @property
    def merged(self) -> Curve:
        """The front without its extrapolated points (ν ≤ 1); a trajectory as it is."""
        if not self.front:
            return self
        return dataclasses.replace(self, points=tuple(p for p in self.points if p.x <= 1))

    @property
    def end(self) -> CurvePoint:
        """The last point: ν = 1 of a merged front, its largest ν otherwise, a trajectory's last step."""
        return self.points[-1]


@dataclasses.dataclass(frozen=True)
class Claim:
    """One of the paper's claims, for one seed: curve `a` lies above curve `b` at matched KL."""

    key: str
    statement: str
    seed: int
    a: str
    b: str
    label_a: str
    label_b: str
    extrapolated: bool = False  # A is its front with the points past ν = 1


@dataclasses.dataclass
class Experiment:
    """What `experiments/*.yaml` holds."""

    config: WarpConfig  # the shared setting; its output_dir is the experiment's folder
    seeds: list[int]  # train_seed of each repetition of claim 3
    nu: list[float]  # the LITI front's points (1 − ν) θ_sft + ν θ, ν > 0
    claim_5_runs: int  # the most runs merged for claim 5
    report_dir: Path  # results.json, the figures and claims.md (default: output_dir/report)
    rloo: list[str] = dataclasses.field(default_factory=list)  # TRL RLOOTrainer arms, one per reference and seed
    keep_trajectories: bool = True  # false: a trajectory's checkpoints are deleted once evaluated

    @classmethod
    def load(cls, path: str | Path) -> Experiment:
        """Read and check an experiment file: a wrong key, type or value is one line, before any work."""
        data = read_yaml(path)
        for key in data:  # strings: `read_yaml` refuses any other key
            if key not in KEYS:
                raise ConfigError(f"experiment file {path}: unknown key {key!r} (keys: {', '.join(KEYS)})")
        config = _config(path, data.get("config", {}))
        seeds, nu = data.get("seeds", [0, 1]), data.get("nu", [0.5, 1.0])
        expect(path, "seeds", seeds, seeds_ok(seeds), "a non-empty list of distinct integers >= 0")
        expect(path, "nu", nu, nu_ok(nu), NU_VALUES)
        runs = data.get("claim_5_runs", config.runs + 2)
        expect(path, "claim_5_runs", runs, integer(runs) and runs > config.runs, f"an integer > runs ({config.runs})")
        report = data.get("report_dir", str(Path(config.output_dir) / "report"))
        expect(path, "report_dir", report, isinstance(report, str) and report != "", "a folder (a string)")
        rloo = data.get("rloo", [])
        rloo_ok = isinstance(rloo, list) and set(rloo) <= set(VARIANTS) and len(set(rloo)) == len(rloo)
        expect(path, "rloo", rloo, rloo_ok, f"a list of distinct references among {', '.join(VARIANTS)}")
        for reference in rloo:
            check_rloo(config, reference)
        keep = data.get("keep_trajectories", True)
        expect(path, "keep_trajectories", keep, isinstance(keep, bool), "true or false")
        experiment = cls(config, seeds, sorted(float(v) for v in nu), runs, Path(report), rloo, keep)
        experiment.arms()  # every arm's config is checked now, before any work
        return experiment

    @property
    def root(self) -> OutputDir:
        return OutputDir(Path(self.config.output_dir))

    def arm_config(self, name: str, **changes: Any) -> WarpConfig:
        """The shared setting in the arm's folder `output_dir/<name>`, with `changes`."""
        config = dataclasses.replace(self.config, output_dir=str(self.root.root / name), **changes)
        validate(config)
        return config

    def arms(self) -> dict[str, Arm]:
        """`warp_seed<s>` (WARP and its baseline), `reinforce_ema` (the baseline alone), and
        `more_runs` (WARP's iteration 1 with `claim_5_runs` runs, its first M those of seed s0)."""
        first = self.seeds[0]
        arms = [Arm(f"warp_seed{s}", self.arm_config(f"warp_seed{s}", train_seed=s)) for s in self.seeds]
        ema = self.arm_config("reinforce_ema", train_seed=first, baseline_anchor="ema")
        more = self.arm_config("more_runs", train_seed=first, iterations=1, runs=self.claim_5_runs, slerp_lambda=None)
        arms += [
            Arm("reinforce_ema", ema, warp=False),
            Arm("more_runs", more, reinforce=False, runs_from=f"warp_seed{first}"),
        ]
        arms += [
            Arm(f"rloo_{v}_seed{s}", self.arm_config(f"rloo_{v}_seed{s}", train_seed=s), False, False, rloo=v)
            for v in self.rloo for s in self.seeds
        ]  # fmt: skip
        return {arm.name: arm for arm in arms}

    def claims(self) -> list[Claim]:
        """Each claim as A above B, in the order of the module docstring; claim 3 once per seed."""
        first, most = self.seeds[0], self.claim_5_runs
        return [
            Claim("ema_anchor", "An EMA anchor gives a better reward–KL trade-off than the SFT anchor.", first,
                  "reinforce_ema", f"reinforce_seed{first}", "REINFORCE, EMA anchor", "REINFORCE, SFT anchor"),
            Claim("slerp_vs_lerp", "Merging runs by SLERP of task vectors gives more reward than LERP, at some "
                  "cost in KL.", first, "iteration_1", "lerp_iteration_1", "SLERP of M runs (front)",
                  "LERP of the same runs (front)"),
            *(Claim("warp_vs_reinforce", "WARP's LITI front lies above the REINFORCE trajectory at equal compute.",
                    s, f"warp_seed{s}", f"reinforce_seed{s}", "WARP LITI front", "REINFORCE trajectory")
              for s in self.seeds),
            *(Claim(EXTRAPOLATED, f"WARP's LITI front extrapolated to ν = {max(self.nu):g} lies above the REINFORCE "
                    "trajectory at equal compute.", s, f"warp_seed{s}", f"reinforce_seed{s}",
                    f"WARP front, ν up to {max(self.nu):g}", "REINFORCE trajectory", extrapolated=True)
              for s in self.seeds if max(self.nu) > 1),
            *(Claim(f"warp_vs_rloo_{v}", f"WARP's LITI front lies above TRL's RLOO trajectory ({REFERENCES[v]}) "
                    "at equal compute.", s, f"warp_seed{s}", f"rloo_{v}_seed{s}", "WARP LITI front",
                    f"TRL RLOO, {REFERENCES[v]}") for v in self.rloo for s in self.seeds),
            Claim("iterations", "Each iteration, starting from the previous LITI point, lifts the front.", first,
                  f"warp_seed{first}", "iteration_1", "front of iteration I", "front of iteration 1"),
            Claim("more_runs", "Merging more runs M gives a better merged policy.", first, f"runs_{most}", "runs_1",
                  "SLERP of the most runs (front)", "one run (front)"),
        ]  # fmt: skip


def expect(path: str | Path, key: str, value: Any, ok: bool, expected: str) -> None:
    if not ok:
        raise ConfigError(f"experiment file {path}: {key}={value!r} is not {expected}")


def integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def seeds_ok(seeds: Any) -> bool:
    return (
        isinstance(seeds, list)
        and len(seeds) > 0
        and all(integer(s) and s >= 0 for s in seeds)
        and len(set(seeds)) == len(seeds)
    )


def finite_numbers(values: Any) -> bool:
    """Whether `values` is a list of finite numbers (booleans are not numbers here)."""
    return isinstance(values, list) and all(
        isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in values
    )


def nu_ok(nu: Any) -> bool:
    """Numbers in (0, `NU_MAX`] with 1 among them, distinct as the policies' names write them."""
    distinct = finite_numbers(nu) and len({f"{v:g}" for v in nu}) == len(nu)
    return distinct and all(0 < v <= NU_MAX for v in nu) and 1 in nu


def config_fields(path: str | Path, fields: Any) -> WarpConfig:
    """An experiment's shared setting: a mapping of config fields, checked as `WarpConfig` checks its own."""
    expect(path, "config", fields, isinstance(fields, dict), "a mapping of config fields")
    for name in fields:
        if name not in FIELDS:
            raise unknown_field(name)
    return WarpConfig(**fields)


def _config(path: str | Path, fields: Any) -> WarpConfig:
    """The shared setting of the paper's claims."""
    config = config_fields(path, fields)
    if config.iterations < 2 or config.runs < 2:
        raise ConfigError(
            f"experiment file {path}: the claims need iterations >= 2 and runs >= 2 (claims 4 and 2), "
            f"not iterations={config.iterations}, runs={config.runs}"
        )
    return config


def run_experiment(experiment: Experiment) -> dict:
    """Train every arm, evaluate every policy the claims need, compare, write the report."""
    shared = experiment.arm_config("shared")
    shared_out = prepare_output(shared)
    reward_stage(shared, shared_out)
    load_splits(shared, shared_out)
    arms = experiment.arms()
    for arm in arms.values():
        _train(arm, shared_out, arms)
        if not experiment.keep_trajectories and (trajectory := _arm_trajectory(arm)) is not None:
            _evaluate_and_prune(experiment, shared, shared_out, trajectory)
    curves = _curves(experiment, arms)
    with timed(experiment.root.root, "evaluate"):
        evaluated = evaluate_points(shared, shared_out, lambda sft: policy_points(curves, sft), experiment.root)
    folders = [OutputDir(shared_out), *(arm.out for arm in arms.values())]
    seconds = sum(sum(read_json(folder.timings).values()) for folder in folders if folder.timings.exists())
    seconds += read_json(experiment.root.timings)["evaluate"]
    results = _results(experiment, arms, curves, evaluated, seconds)
    write_report(experiment, results)
    return results


def _train(arm: Arm, shared: Path, arms: dict[str, Arm]) -> None:
    """What `arm` trains, in its folder, from the shared reward model and splits."""
    out = prepare_output(arm.config)
    share_data(shared, out)
    if arm.runs_from is not None:
        source = arms[arm.runs_from]
        _link_runs(source.out, arm.out, source.config.runs)
    if arm.rloo is not None:
        with timed(out, "train rloo"):
            train_rloo(arm.config, out, load_splits(arm.config, out).rl_prompts, arm.rloo)
    if arm.warp:
        train_stage(dataclasses.replace(arm.config, method="warp"), out, resume=True)
    if arm.reinforce:
        train_stage(dataclasses.replace(arm.config, method="reinforce"), out, resume=True)


def _link_runs(source: OutputDir, target: OutputDir, runs: int) -> None:
    """The first `runs` runs of iteration 1 of `source`, as runs of `target` (the same seeds: a
    run's randomness depends on its train_seed, iteration and number, not on M)."""
    target.iteration(1).mkdir(parents=True, exist_ok=True)
    for m in range(1, runs + 1):
        link = target.run(1, m).path
        if not link.exists():
            link.symlink_to(source.run(1, m).path.resolve(), target_is_directory=True)


def _interpolated(theta: Callable[[], State], nu: float, sft: State) -> State:
    """(1 − ν) θ_sft + ν θ: the point ν of θ's LITI front (the paper's Eq. 4 with θ_init = θ_sft)."""
    weights = theta()
    return {k: lerp(sft[k], weights[k], nu) for k in sft}


def _from_file(path: Path, sft: State) -> State:
    return load_tensors(path)


def _merge(folder: OutputDir, runs: int, method: str, weight: float | None) -> State:
    """θ_init + SLERP (or LERP) of iteration 1's first `runs` runs of `folder`, with λ `weight`."""
    load = run_tensors([folder.run(1, m) for m in range(1, runs + 1)])
    return merge_task_vectors(load_tensors(folder.init(1)), load, runs, weight, method)


def front(name: str, theta: Callable[[], State], nu: list[float]) -> Curve:
    """The LITI front of the policy `theta()`, one point `<name>_nu<ν>` per ν."""
    return Curve(name, tuple(CurvePoint(f"{name}_nu{v:g}", v, functools.partial(_interpolated, theta, v)) for v in nu))


def warp_front(name: str, config: WarpConfig, nu: list[float]) -> Curve:
    """The LITI front of the WARP policy `config` trained: the SLERP of its last iteration."""
    final = OutputDir(Path(config.output_dir)).slerp(config.iterations)
    return front(name, functools.partial(load_tensors, final), nu)


def _arm_trajectory(arm: Arm) -> Curve | None:
    """The trajectory `arm` trains — REINFORCE's baseline or TRL RLOO's policy — one point
    `<name>_step<k>` per evaluated checkpoint; None for an arm without one."""
    name = arm.trajectory_name
    if name is None:
        return None
    if arm.rloo is not None:
        files = rloo_files(arm.config, arm.out.root, arm.rloo)
    else:
        files = trajectory_files(arm.config, arm.out.baseline)
    points = tuple(CurvePoint(f"{name}_step{k}", k, functools.partial(_from_file, p), p) for k, p in files)
    return Curve(name, points, front=False)


def _evaluate_and_prune(experiment: Experiment, shared: WarpConfig, shared_out: Path, trajectory: Curve) -> None:
    """Evaluate a trajectory now, then delete its checkpoints but the last (the arm's final
    policy): their values stay in `eval/policies`, which is all the claims read. Its seconds count
    in the experiment's `evaluate`."""
    with timed(experiment.root.root, "evaluate"):
        points = functools.partial(policy_points, {trajectory.name: trajectory})
        evaluate_points(shared, shared_out, points, experiment.root)
    for point in trajectory.points[:-1]:
        if experiment.root.evaluated(point.name).exists() and point.file.exists():
            point.file.unlink()


def _curves(experiment: Experiment, arms: dict[str, Arm]) -> dict[str, Curve]:
    """Every curve the claims compare, by name."""
    nu, first = experiment.nu, experiment.seeds[0]
    curves = []
    for s in experiment.seeds:
        arm = arms[f"warp_seed{s}"]
        curves += [warp_front(f"warp_seed{s}", arm.config, nu), _arm_trajectory(arm)]
    nu = [v for v in nu if v <= 1]  # the other claims compare merges, not their extrapolations
    out, runs = arms[f"warp_seed{first}"].out, experiment.config.runs
    weight = experiment.config.slerp_lambda  # the λ iteration 1 was merged with
    curves += [
        front("iteration_1", functools.partial(load_tensors, out.slerp(1)), nu),
        front("lerp_iteration_1", functools.partial(_merge, out, runs, "lerp", weight), nu),
        _arm_trajectory(arms["reinforce_ema"]),
    ]
    curves += [_arm_trajectory(arm) for arm in arms.values() if arm.rloo is not None]
    more = arms["more_runs"].out
    curves += [
        front(f"runs_{m}", functools.partial(_merge, more, m, "slerp", None), nu)
        for m in range(1, experiment.claim_5_runs + 1)
        if m != runs  # M = runs is iteration_1 itself
    ]
    return {curve.name: curve for curve in curves}


def policy_points(curves: dict[str, Curve], sft: State) -> list[tuple[str, dict, Callable[[], State]]]:
    """What `evaluate_points` samples: the SFT policy, then every curve's points."""
    points = [("sft", {"kind": "sft"}, lambda: sft)]
    for curve in curves.values():
        points += [
            (p.name, {"kind": "experiment", "curve": curve.name, "x": p.x}, functools.partial(p.weights, sft))
            for p in curve.points
        ]
    return points


def _answer(claim: Claim, curves: dict[str, Curve], evaluated: dict) -> dict:
    """A claim's record in results.json: A − B at matched KL and its verdict, and A − B between
    the curves' ends, paired over prompts (reward, and KL in nats). Claim 3's also holds A − B
    across the whole shared KL range (`across`), for its difference figure."""
    a, b = curves[claim.a] if claim.extrapolated else curves[claim.a].merged, curves[claim.b].merged
    sft = point_of(evaluated["sft"][1])

    def points(curve: Curve) -> list[Point]:
        return [sft] + [point_of(evaluated[p.name][1]) for p in curve.points]

    differences = compare(points(a), points(b))
    ends = [evaluated[curve.end.name][1] for curve in (a, b)]
    (reward, reward_se), (kl, kl_se) = (
        paired_difference(*(getattr(s, m) for s in ends)) for m in ("reward", "kl_exact")
    )
    return {
        "claim": claim.key, "statement": claim.statement, "seed": claim.seed, "a": claim.a, "b": claim.b,
        "label_a": claim.label_a, "label_b": claim.label_b, "verdict": verdict(differences),
        "differences": [{"kl": d.kl, "difference": d.difference, "se": d.se, "z": d.z} for d in differences],
        "endpoints": {"a": a.end.name, "b": b.end.name, "reward_difference": reward, "reward_se": reward_se,
                      "kl_difference": kl, "kl_se": kl_se},
    } | ({"across": _across(points(a), points(b))} if claim.key in DIFFERENCE_CLAIMS else {})  # fmt: skip


def _across(a: list[Point], b: list[Point]) -> list[dict]:
    """A − B at `DIFFERENCE_POINTS` KL values evenly inside the shared range, each with its
    paired-bootstrap standard error."""
    low, high = overlap(a, b)
    kls = [low + (high - low) * (k + 1) / (DIFFERENCE_POINTS + 1) for k in range(DIFFERENCE_POINTS)]
    return [{"kl": d.kl, "difference": d.difference, "se": d.se} for d in compare(a, b, kls)]


def _results(
    experiment: Experiment, arms: dict[str, Arm], curves: dict[str, Curve], evaluated: dict, seconds: float
) -> dict:
    """results.json: the budget, every claim's answer, every policy's summary, every curve's points,
    each method's seconds per step, TRL's settings of the RLOO arms, and with several seeds the
    methods' curves as means over the seeds (`seed_level`)."""
    policies = {name: {**samples.summary(), **meta} for name, (meta, samples) in evaluated.items()}
    config = experiment.config
    budget = {
        "iterations": config.iterations, "runs": config.runs, "steps": config.steps, "batch_size": config.batch_size,
        "learning_rate": config.learning_rate, "eval_prompts": len(evaluated["sft"][1].prompts),
        "seeds": experiment.seeds, "claim_5_runs": experiment.claim_5_runs, "nu": experiment.nu,
        "trajectory_points": config.trajectory_points, "seconds": round(seconds),
    }  # fmt: skip
    return {
        "budget": budget,
        "claims": [_answer(claim, curves, evaluated) for claim in experiment.claims()],
        "policies": policies,
        "curves": {name: [p.name for p in curve.points] for name, curve in curves.items()},
        "extrapolated": [p.name for curve in curves.values() if curve.front for p in curve.points if p.x > 1],
        "seconds_per_step": _seconds_per_step(experiment, arms),
    } | ({"rloo": {v: _rloo_settings(experiment, arms, v) for v in experiment.rloo}} if experiment.rloo else {}) | (
        {"seed_level": _seed_level(experiment, curves, evaluated)} if len(experiment.seeds) > 1 else {}
    )  # fmt: skip


def _rloo_settings(experiment: Experiment, arms: dict[str, Arm], reference: str) -> dict:
    """TRL's version and the `RLOOConfig` fields its arms set, each arm's seed its `train_seed`."""
    metrics = read_json(rloo_folder(arms[f"rloo_{reference}_seed{experiment.seeds[0]}"].out.root, reference) / METRICS)
    settings = {k: v for k, v in metrics["settings"].items() if k != "seed"}
    return {"trl_version": metrics["trl_version"], "settings": settings, "seeds": experiment.seeds}


def _seconds_per_step(experiment: Experiment, arms: dict[str, Arm]) -> list[dict]:
    """Wall-clock seconds per step of `batch_size` completions of each method (its training stage's
    seconds over its I·M·T steps, model loading included), the mean over the seeds; WARP's M runs
    step side by side as `backend` places them."""
    steps = total_steps(experiment.config)
    def timing(arm: Arm, stage: str) -> float | None:
        if arm.rloo is not None:  # the finished training's own seconds, not an interrupted attempt's
            return read_json(rloo_folder(arm.out.root, arm.rloo) / METRICS)["seconds"]
        return read_json(arm.out.timings).get(stage)

    stages = {"warp": ("warp_seed{s}", "train warp"), "reinforce": ("warp_seed{s}", "train reinforce")}
    stages |= {f"rloo_{v}": (f"rloo_{v}_seed{{s}}", "") for v in experiment.rloo}
    seconds = []
    for method, (arm, stage) in stages.items():
        timings = [timing(arms[arm.format(s=s)], stage) for s in experiment.seeds]
        if all(t is not None for t in timings):
            seconds.append({"method": method, "seconds": sum(timings) / len(timings) / steps})
    return seconds


def _seed_level(experiment: Experiment, curves: dict[str, Curve], evaluated: dict) -> dict:
    """WARP's front, REINFORCE's and each RLOO arm's trajectory as means over the training seeds,
    and WARP against each of them."""
    sft = point_of(evaluated["sft"][1])

    def seeds(name: str) -> list[list[Point]]:
        return [[sft, *(point_of(evaluated[p.name][1]) for p in curves[name.format(s=s)].merged.points)]
                for s in experiment.seeds]  # fmt: skip

    methods = {"warp": ("WARP LITI front", seeds("warp_seed{s}")),
               "reinforce": ("REINFORCE trajectory", seeds("reinforce_seed{s}"))}  # fmt: skip
    methods |= {f"rloo_{v}": (f"TRL RLOO, {REFERENCES[v]}", seeds(f"rloo_{v}_seed{{s}}")) for v in experiment.rloo}
    claims = [("warp_vs_reinforce", "warp", "reinforce")]
    claims += [(f"warp_vs_rloo_{v}", "warp", f"rloo_{v}") for v in experiment.rloo]
    return seed_level(methods, claims)


def write_report(experiment: Experiment, results: dict) -> None:
    """Into `report_dir`: results.json, a figure per claim, and the claims table, claims.md."""
    folder = experiment.report_dir
    write_json(folder / "results.json", results)
    for key in dict.fromkeys(claim["claim"] for claim in results["claims"]):
        if key != EXTRAPOLATED:
            save_figure(claim_figure(results, key), folder / f"{key}.png")
    if any("across" in claim for claim in results["claims"]):
        save_figure(difference_figure(results), folder / "warp_vs_reinforce_difference.png")
    if "seed_level" in results:
        save_figure(seed_level_figure(results["seed_level"]), folder / "seed_level.png")
    write_text(folder / "claims.md", claims_table(results))


def claims_table(results: dict) -> str:
    """One row per claim (and seed) of a results file: A − B at each matched KL, ± s.e., the
    verdict, and A − B between the curves' last points (paired over prompts: reward, and KL in nats)."""
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
    if "seed_level" in results:
        level = results["seed_level"]
        lines += [
            "", f"Over the training seeds ({level['se']}), on the KL range every seed's curve covers:", "",
            "| claim | A − B at matched KL (nats): mean reward difference ± s.e. over seeds | verdict |",
            "|---|---|---|",
        ]  # fmt: skip
        for claim in level["claims"]:
            cells = "; ".join(f"KL {d['kl']:.2f}: {d['difference']:+.3f} ± {d['se']:.3f}" for d in claim["differences"])
            name = f"{claim['claim']} ({claim['label_a']} − {claim['label_b']})"
            lines.append(f"| {name} | {cells} | {claim['verdict']} |")
    if results.get("seconds_per_step"):
        each = ", ".join(f"{row['method']} {row['seconds']:.2f} s" for row in results["seconds_per_step"])
        lines += ["", f"Seconds per step of {results['budget']['batch_size']} completions (mean over seeds): {each}."]
    return "\n".join(lines) + "\n"


def claim_figure(results: dict, key: str) -> Figure:
    """Reward against KL with error bars for the curves a claim compares (every seed's); a front's
    points past ν = 1 dotted."""
    policies, curves = results["policies"], results["curves"]
    beyond = set(results.get("extrapolated", []))
    figure = Figure(figsize=(6.4, 4.6))
    axes = figure.subplots()
    sft = policies["sft"]
    drawn = set()
    for claim in (c for c in results["claims"] if c["claim"] == key):
        for curve, label in ((claim["a"], claim["label_a"]), (claim["b"], claim["label_b"])):
            if curve in drawn:
                continue
            drawn.add(curve)
            names = curves[curve]
            merged = [n for n in names if n not in beyond]
            color = _errorbars(axes, [sft] + [policies[n] for n in merged], "-o", f"{label} ({curve})")
            if len(merged) < len(names):
                rows = [policies[n] for n in [merged[-1], *(n for n in names if n in beyond)]]
                _errorbars(axes, rows, ":o", f"{curve}, extrapolated (ν > 1)", color)
    axes.set_xlabel(KL_LABEL)
    axes.set_ylabel("mean reward")
    axes.set_title(key.replace("_", " "))
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7)
    return figure


def _errorbars(axes, rows: list[dict], fmt: str, label: str, color: str | None = None) -> str:
    """Mean reward against mean KL of `rows`, ± their standard errors; the line's colour."""
    bars = axes.errorbar(
        [r["kl_exact_mean"] for r in rows], [r["reward_mean"] for r in rows],
        xerr=[r["kl_exact_se"] for r in rows], yerr=[r["reward_se"] for r in rows],
        fmt=fmt, capsize=3, label=label, color=color,
    )  # fmt: skip
    return bars.lines[0].get_color()


def difference_figure(results: dict) -> Figure:
    """Claim 3, one panel per seed: WARP's front − the REINFORCE trajectory against KL across the
    whole shared range, ± 2 paired-bootstrap standard errors (a band); with ν > 1, the extrapolated
    front too. Above zero WARP leads at that KL; a band that holds zero is no lead either way."""
    seeds = sorted({c["seed"] for c in results["claims"] if "across" in c})
    figure = Figure(figsize=(4.2 * len(seeds), 3.8))
    panels = figure.subplots(1, len(seeds), squeeze=False)[0]
    for axes, seed in zip(panels, seeds, strict=True):
        for claim in (c for c in results["claims"] if "across" in c and c["seed"] == seed):
            kl = [d["kl"] for d in claim["across"]]
            difference = [d["difference"] for d in claim["across"]]
            band = [2 * d["se"] for d in claim["across"]]
            (line,) = axes.plot(kl, difference, label=claim["label_a"])
            axes.fill_between(
                kl, [d - b for d, b in zip(difference, band, strict=True)],
                [d + b for d, b in zip(difference, band, strict=True)], alpha=0.25, color=line.get_color(),
            )  # fmt: skip
        axes.axhline(0.0, color="black", linewidth=0.8)
        axes.set_title(f"seed {seed}")
        axes.grid(alpha=0.3)
    figure.supxlabel(KL_LABEL, fontsize=10)
    panels[0].set_ylabel("reward: WARP − REINFORCE (± 2 s.e.)")
    panels[0].legend(fontsize=7)
    return figure
