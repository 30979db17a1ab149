"""`warp-rlhf experiment --config experiments/warm.yaml`: does WARM hold here?

WARM (Ramé et al., 2024, "WARM: On the Benefits of Weight Averaged Reward Models") claims that
the weight average of K reward models fine-tuned from one backbone is more reliable than one of
them, and more robust to corrupted preference labels, so that a policy trained against it
exploits its reward less. Two questions, each answered with standard errors:

(a) `accuracy`: held-out pairwise accuracy of one member, of WARM (the weight average, one
    forward) and of ENS (the mean of the members' scores, K forwards), for each `label_noise`
    (the fraction of training pairs swapped); standard errors from a bootstrap over the pairs,
    paired (the same resampled pairs for every model).
(b) `gold_reward` / `judge`: WARP trained against one reward model (member 1) and against WARM,
    same budget and seeds, for each `policy_label_noise`, judged at matched KL to the SFT policy
    by what neither saw: a gold reward model fine-tuned on `gold_pairs` other pairs (disjoint
    reviews, clean labels), and VADER. More gold reward at the same KL is less reward hacking.

Folders under `output_dir`: `shared` (the data splits, cut once for all: the proxies' pairs, then
the gold model's), `rewards_noise<p>` (K members and their average), `gold`, `warp_<one|warm>_
noise<p>_seed<s>` (WARP against member 1 or WARM of `rewards_noise<p>`, linked, not retrained),
`rewards` (links naming the gold model and each proxy), `evaluation` (every policy scored by the
gold model, each proxy and VADER, kept in its `eval/`). Every trained model and evaluated policy
is reused when done, so an interrupted experiment resumes; question (a)'s scores of the held-out
pairs are recomputed (seconds). Results go to `report_dir` and nowhere else.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure

from warp_rlhf.checkpoint import read_json, write_json, write_text
from warp_rlhf.config import WarpConfig, read_yaml, validate
from warp_rlhf.errors import ConfigError
from warp_rlhf.layout import OutputDir
from warp_rlhf.stages import experiment as paper
from warp_rlhf.stages.compare import Difference, Point, compare, point_of, verdict
from warp_rlhf.stages.data import Splits
from warp_rlhf.stages.pipeline import evaluate_points, load_splits, prepare_output, reward_stage, train_stage
from warp_rlhf.stages.plots import KL_LABEL, save_figure
from warp_rlhf.stages.report import timed
from warp_rlhf.stages.reward import RewardModel

KEYS = ("experiment", "config", "label_noise", "policy_label_noise", "gold_pairs", "seeds", "nu", "report_dir")
"""What a WARM experiment file may hold (`experiment: warm` selects this module)."""

JUDGED = {"reward": "gold reward", "judge": "VADER"}
"""What each evaluated metric of question (b) is."""

RESAMPLES = 2000
"""Bootstrap resamples of the held-out pairs."""


@dataclasses.dataclass
class WarmExperiment:
    """What `experiments/warm.yaml` holds."""

    config: WarpConfig  # the shared setting: reward_models K, reward_train_pairs each proxy's pairs
    label_noise: list[float]  # the fractions of swapped training pairs of question (a)
    policy_label_noise: list[float]  # those of (a) whose reward models WARP trains against in (b)
    gold_pairs: int  # the gold reward model's training pairs, disjoint from the proxies'
    seeds: list[int]  # train_seed of each WARP run of (b)
    nu: list[float]  # the LITI front's points (1 − ν) θ_sft + ν θ
    report_dir: Path

    @classmethod
    def load(cls, path: str | Path) -> WarmExperiment:
        """Read and check an experiment file: a wrong key, type or value is one line, before any work."""
        data = read_yaml(path)
        for key in data:
            if key not in KEYS:
                raise ConfigError(f"experiment file {path}: unknown key {key!r} (keys: {', '.join(KEYS)})")
        config = paper.config_fields(path, data.get("config", {}))
        if config.reward_models < 2 or config.reward_funcs:
            raise ConfigError(
                f"experiment file {path}: WARM needs reward_models >= 2 and the trained reward (no reward_funcs), "
                f"not reward_models={config.reward_models}"
            )
        noise, policy_noise = data.get("label_noise", [0.0, 0.25]), data.get("policy_label_noise", [0.25])
        fractions = "a list of distinct fractions in [0, 0.5)"
        paper.expect(path, "label_noise", noise, _fractions_ok(noise), fractions)
        paper.expect(
            path, "policy_label_noise", policy_noise,
            _fractions_ok(policy_noise) and set(policy_noise) <= set(noise), f"{fractions}, each one of label_noise",
        )  # fmt: skip
        gold = data.get("gold_pairs", 2 * config.reward_train_pairs)
        paper.expect(path, "gold_pairs", gold, paper.integer(gold) and gold > 0, "an integer > 0")
        seeds, nu = data.get("seeds", [0]), data.get("nu", [0.5, 1.0])
        paper.expect(path, "seeds", seeds, paper.seeds_ok(seeds), "a non-empty list of distinct integers >= 0")
        nu_ok = paper.nu_ok(nu) and max(nu) <= 1  # the fronts of merges: no extrapolation here
        paper.expect(path, "nu", nu, nu_ok, "a list of distinct numbers in (0, 1], 1 among them")
        report = data.get("report_dir", str(Path(config.output_dir) / "report"))
        paper.expect(path, "report_dir", report, isinstance(report, str) and report != "", "a folder (a string)")
        experiment = cls(
            config, [float(p) for p in noise], [float(p) for p in policy_noise], gold, seeds,
            sorted(float(v) for v in nu), Path(report),
        )  # fmt: skip
        experiment.policy_configs()  # every config is checked now, before any work
        return experiment

    @property
    def root(self) -> OutputDir:
        return OutputDir(Path(self.config.output_dir))

    def folder_config(self, name: str, **changes: Any) -> WarpConfig:
        """The shared setting in the folder `output_dir/<name>`, with `changes`."""
        config = dataclasses.replace(self.config, output_dir=str(self.root.root / name), **changes)
        validate(config)
        return config

    def shared_config(self) -> WarpConfig:
        """The splits of every folder: the proxies' pairs first, then the gold model's."""
        return self.folder_config("shared", reward_train_pairs=self.config.reward_train_pairs + self.gold_pairs)

    def reward_config(self, noise: float) -> WarpConfig:
        return self.folder_config(rewards_folder(noise), reward_label_noise=noise)

    def gold_config(self) -> WarpConfig:
        return self.folder_config("gold", reward_models=1, reward_label_noise=0.0, reward_train_pairs=self.gold_pairs)

    def policy_configs(self) -> dict[str, WarpConfig]:
        """WARP against member 1 (`one`: a one-model reward stage, bitwise member 1) or WARM, per
        noise and seed."""
        return {
            policy_name(reward, noise, seed): self.folder_config(
                policy_name(reward, noise, seed), method="warp", train_seed=seed, reward_label_noise=noise,
                reward_models=self.config.reward_models if reward == "warm" else 1,
            )
            for noise in self.policy_label_noise for seed in self.seeds for reward in ("one", "warm")
        }  # fmt: skip


def rewards_folder(noise: float) -> str:
    return f"rewards_noise{noise:g}"


def policy_name(reward: str, noise: float, seed: int) -> str:
    return f"warp_{reward}_noise{noise:g}_seed{seed}"


def _fractions_ok(values: Any) -> bool:
    distinct = paper.finite_numbers(values) and len(set(values)) == len(values)
    return distinct and len(values) > 0 and all(0 <= v < 0.5 for v in values)


def run_warm_experiment(experiment: WarmExperiment) -> dict:
    """Cut the splits, train the reward models and the policies, evaluate, compare, report."""
    shared = experiment.shared_config()
    splits = load_splits(shared, prepare_output(shared))
    proxies, n = splits.reward_train[: experiment.config.reward_train_pairs], experiment.config.reward_train_pairs
    for noise in experiment.label_noise:
        _reward_folder(experiment.reward_config(noise), dataclasses.replace(splits, reward_train=proxies))
    gold = _reward_folder(experiment.gold_config(), dataclasses.replace(splits, reward_train=splits.reward_train[n:]))
    accuracy = {f"{noise:g}": _accuracies(experiment, noise, splits.reward_eval) for noise in experiment.label_noise}
    for name, config in experiment.policy_configs().items():
        out = prepare_output(config)
        noise_folder = OutputDir(Path(experiment.reward_config(config.reward_label_noise).output_dir))
        reward = noise_folder.reward_model if name.startswith("warp_warm") else noise_folder.reward_member(1)
        _link(reward, OutputDir(out).reward_model)
        _copy_splits(noise_folder, OutputDir(out))
        train_stage(config, out, resume=True)
    evaluation = _evaluation_config(experiment, gold)
    out = prepare_output(evaluation)
    _copy_splits(OutputDir(gold), OutputDir(out))
    configs = experiment.policy_configs()
    fronts = {name: paper.warp_front(name, config, experiment.nu) for name, config in configs.items()}
    with timed(experiment.root.root, "evaluate"):
        evaluated = evaluate_points(evaluation, out, lambda sft: paper.policy_points(fronts, sft), OutputDir(out))
    results = _results(experiment, accuracy, fronts, evaluated)
    write_report(experiment, results)
    return results


def _reward_folder(config: WarpConfig, splits: Splits) -> Path:
    """`config`'s folder with `splits` as its data, and its reward stage done."""
    out = prepare_output(config)
    if not OutputDir(out).splits.exists():
        write_json(OutputDir(out).splits, dataclasses.asdict(splits))
    reward_stage(config, out)
    return out


def _link(target: Path, link: Path) -> None:
    """`link` → `target`, made once; a link to anything else is refused, never replaced."""
    if not link.is_symlink() and not link.exists():
        link.symlink_to(target.resolve(), target_is_directory=True)
    elif link.resolve() != target.resolve():
        raise ConfigError(f"{link} exists and is not a link to {target}: move it away and run again")


def _copy_splits(source: OutputDir, target: OutputDir) -> None:
    if not target.splits.exists():
        write_json(target.splits, read_json(source.splits))


def _evaluation_config(experiment: WarmExperiment, gold: Path) -> WarpConfig:
    """The evaluation: the gold model is the reward (weight 1), each proxy a reward of weight 0
    (scored, not summed), VADER the judge. The rewards are named by links in `output_dir/rewards`."""
    links = experiment.root.root / "rewards"
    links.mkdir(parents=True, exist_ok=True)
    rewards = {"gold": OutputDir(gold).reward_model}
    for noise in experiment.policy_label_noise:
        folder = OutputDir(Path(experiment.reward_config(noise).output_dir))
        rewards[f"one_noise{noise:g}"], rewards[f"warm_noise{noise:g}"] = folder.reward_member(1), folder.reward_model
    for key, target in rewards.items():
        _link(target, links / key)
    funcs = [str(links / key) for key in rewards]
    return experiment.folder_config(
        "evaluation", reward_funcs=funcs, reward_weights=[1.0] + [0.0] * (len(funcs) - 1), judge="vader"
    )


def _accuracies(experiment: WarmExperiment, noise: float, pairs: list[tuple[str, str]]) -> dict:
    """Question (a) for one noise: each member's, WARM's and ENS's held-out pairwise accuracy,
    and the paired differences, each with its bootstrap standard error over the pairs."""
    folder = OutputDir(Path(experiment.reward_config(noise).output_dir))
    chosen, rejected = (list(texts) for texts in zip(*pairs, strict=True))
    margins = {}  # r(chosen) − r(rejected) per pair
    for k in range(1, experiment.config.reward_models + 1):
        margins[f"member_{k}"] = _margins(folder.reward_member(k), chosen, rejected)
    margins["warm"] = _margins(folder.reward_model, chosen, rejected)
    members = [margins[f"member_{k}"] for k in range(1, experiment.config.reward_models + 1)]
    margins["ens"] = torch.stack(members).mean(0)  # ENS: the mean score, so the mean margin
    correct = {name: (margin > 0).double() for name, margin in margins.items()}
    correct["member_mean"] = torch.stack([correct[f"member_{k}"] for k in range(1, len(members) + 1)]).mean(0)
    statistics = correct | {
        "warm_minus_member_mean": correct["warm"] - correct["member_mean"],
        "warm_minus_member_1": correct["warm"] - correct["member_1"],
        "ens_minus_member_mean": correct["ens"] - correct["member_mean"],
        "warm_minus_ens": correct["warm"] - correct["ens"],
    }
    ses = bootstrap_se(statistics, seed=experiment.config.seed)
    return {name: {"mean": values.mean().item(), "se": ses[name]} for name, values in statistics.items()}


@torch.no_grad()
def _margins(model: Path, chosen: list[str], rejected: list[str]) -> torch.Tensor:
    scorer = RewardModel.from_pretrained(model)
    return (scorer.score(chosen) - scorer.score(rejected)).double()


def bootstrap_se(values: dict[str, torch.Tensor], *, resamples: int = RESAMPLES, seed: int = 0) -> dict[str, float]:
    """The standard error of each per-pair mean over `resamples` resamplings of the pairs, the same
    resampled pairs for every statistic (so differences of paired values are paired)."""
    n = len(next(iter(values.values())))
    chosen = torch.randint(n, (resamples, n), generator=torch.Generator().manual_seed(seed))
    return {name: v[chosen].mean(-1).std().item() for name, v in values.items()}


def _results(experiment: WarmExperiment, accuracy: dict, fronts: dict[str, paper.Curve], evaluated: dict) -> dict:
    """results.json: the budget, question (a)'s accuracies, question (b)'s comparisons, every
    policy's summary and every front's points."""
    claims = []
    for noise in experiment.label_noise:
        acc = accuracy[f"{noise:g}"]
        for key, name, statement in (
            (
                "warm_vs_one",
                "warm_minus_member_mean",
                "WARM is more accurate than one reward model (the members' mean).",
            ),
            ("warm_vs_ens", "warm_minus_ens", "WARM is more accurate than ENS, at one forward instead of K."),
        ):
            difference = Difference(0.0, acc[name]["mean"], acc[name]["se"])
            claims.append({"claim": key, "statement": statement, "label_noise": noise,
                           "difference": difference.difference, "se": difference.se, "z": difference.z,
                           "verdict": verdict([difference])})  # fmt: skip
    for noise in experiment.policy_label_noise:
        for seed in experiment.seeds:
            warm, one = (policy_name(r, noise, seed) for r in ("warm", "one"))
            for key, metric in (("gold_reward", "reward"), ("judge", "judge")):
                a, b = (_curve(fronts[name], evaluated, metric) for name in (warm, one))
                differences = compare(a, b)
                claims.append({
                    "claim": key, "label_noise": noise, "seed": seed, "a": warm, "b": one,
                    "statement": f"WARP against WARM scores more {JUDGED[metric]} at matched KL than WARP "
                    "against one reward model.",
                    "differences": [dataclasses.asdict(d) | {"z": d.z} for d in differences],
                    "verdict": verdict(differences),
                })  # fmt: skip
    policies = {name: {**samples.summary(), **meta} for name, (meta, samples) in evaluated.items()}
    config = experiment.config
    folders = [experiment.root.root / name for name in ("shared", "gold", "evaluation")]
    folders += [Path(experiment.reward_config(p).output_dir) for p in experiment.label_noise]
    folders += [Path(c.output_dir) for c in experiment.policy_configs().values()] + [experiment.root.root]
    seconds = sum(sum(read_json(OutputDir(f).timings).values()) for f in folders if OutputDir(f).timings.exists())
    budget = {
        "reward_models": config.reward_models, "reward_train_pairs": config.reward_train_pairs,
        "gold_pairs": experiment.gold_pairs, "reward_eval_pairs": config.reward_eval_pairs,
        "label_noise": experiment.label_noise, "policy_label_noise": experiment.policy_label_noise,
        "iterations": config.iterations, "runs": config.runs, "steps": config.steps, "batch_size": config.batch_size,
        "learning_rate": config.learning_rate, "seeds": experiment.seeds, "nu": experiment.nu,
        "eval_prompts": len(evaluated["sft"][1].prompts), "seconds": round(seconds),
    }  # fmt: skip
    return {
        "budget": budget,
        "accuracy": accuracy,
        "claims": claims,
        "policies": policies,
        "curves": {name: [p.name for p in curve.points] for name, curve in fronts.items()},
    }


def _curve(front: paper.Curve, evaluated: dict, metric: str) -> list[Point]:
    """The SFT point and the front's points, on the gold reward (`reward`) or VADER (`judge`)."""
    names = ["sft", *(p.name for p in front.points)]
    return [point_of(evaluated[n][1], metric) for n in names]


def write_report(experiment: WarmExperiment, results: dict) -> None:
    """Into `report_dir`: results.json, the two figures and the claims table, claims.md."""
    folder = experiment.report_dir
    write_json(folder / "results.json", results)
    save_figure(accuracy_figure(results), folder / "accuracy.png")
    save_figure(policy_figure(results), folder / "gold_reward.png")
    write_text(folder / "claims.md", claims_table(results))


def claims_table(results: dict) -> str:
    """Two tables: the reward models' held-out accuracies, and every claim with its verdict."""
    members = results["budget"]["reward_models"]
    names = [f"member_{k}" for k in range(1, members + 1)] + ["member_mean", "warm", "ens"]
    titles = [f"member {k}" for k in range(1, members + 1)] + ["members' mean", "WARM", "ENS"]
    lines = ["| training pairs swapped | " + " | ".join(titles) + " |", "|---" * (len(titles) + 1) + "|"]
    for noise, acc in results["accuracy"].items():
        lines.append(
            f"| {float(noise):.0%} | " + " | ".join(f"{acc[n]['mean']:.3f} ± {acc[n]['se']:.3f}" for n in names) + " |"
        )
    lines += ["", "| claim | pairs swapped | seed | A − B ± s.e. | verdict |", "|---|---|---|---|---|"]
    for claim in results["claims"]:
        if "differences" in claim:
            cells = "; ".join(f"KL {d['kl']:.2f}: {d['difference']:+.3f} ± {d['se']:.3f}" for d in claim["differences"])
        else:
            cells = f"{claim['difference']:+.3f} ± {claim['se']:.3f}"
        seed = claim.get("seed", "–")
        lines.append(f"| {claim['claim']}: {claim['statement']} | {claim['label_noise']:.0%} | {seed} | {cells} "
                     f"| {claim['verdict']} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def accuracy_figure(results: dict) -> Figure:
    """Held-out pairwise accuracy of each member, WARM and ENS, per fraction of swapped pairs, ± 2 s.e."""
    figure = Figure(figsize=(6.4, 4.2))
    axes = figure.subplots()
    members = results["budget"]["reward_models"]
    names = [f"member_{k}" for k in range(1, members + 1)] + ["warm", "ens"]
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        rows = [acc[name] for acc in results["accuracy"].values()]
        axes.bar(
            [x + (i - (len(names) - 1) / 2) * width for x in range(len(rows))], [r["mean"] for r in rows], width,
            yerr=[2 * r["se"] for r in rows], capsize=3, label=name.replace("_", " "),
        )  # fmt: skip
    axes.set_xticks(range(len(results["accuracy"])), [f"{float(p):.0%} swapped" for p in results["accuracy"]])
    low = min(acc[n]["mean"] - 2 * acc[n]["se"] for acc in results["accuracy"].values() for n in names)
    high = max(acc[n]["mean"] + 2 * acc[n]["se"] for acc in results["accuracy"].values() for n in names)
    axes.set_ylim(max(0.0, low - 0.03), min(1.0, high + 0.05))
    axes.set_ylabel("held-out pairwise accuracy (± 2 s.e.)")
    axes.legend(fontsize=7, ncol=2)
    axes.grid(alpha=0.3, axis="y")
    return figure


def policy_figure(results: dict) -> Figure:
    """Gold reward (left) and VADER (right) against KL: each WARP's LITI front from the SFT
    policy, with error bars; WARM solid, one reward model dashed."""
    figure = Figure(figsize=(11, 4.4))
    left, right = figure.subplots(1, 2)
    policies, sft = results["policies"], results["policies"]["sft"]
    for name, points in results["curves"].items():
        rows = [sft] + [policies[p] for p in points]
        style = "-o" if name.startswith("warp_warm") else "--s"
        for axes, metric in ((left, "reward"), (right, "judge")):
            axes.errorbar(
                [r["kl_exact_mean"] for r in rows], [r[f"{metric}_mean"] for r in rows],
                xerr=[r["kl_exact_se"] for r in rows], yerr=[r[f"{metric}_se"] for r in rows],
                fmt=style, capsize=3, label=name,
            )  # fmt: skip
    for axes, title in ((left, "gold reward model"), (right, "VADER (judge)")):
        axes.set_xlabel(KL_LABEL)
        axes.set_ylabel(title)
        axes.grid(alpha=0.3)
    left.legend(fontsize=7)
    return figure
