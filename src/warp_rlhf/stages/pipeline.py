"""The stages of a run over one output folder; each reuses what an earlier call finished.

    reward_stage    the Bradley–Terry reward model (`reward`) from the data's preference pairs
    train_stage     WARP (`algorithm.warp`) or the REINFORCE baseline (`algorithm.baseline`) → final/
    evaluate_stage  every policy found in the folder on held-out prompts (`evaluate`) → eval/, report.md

The folder's paths are named in `warp_rlhf.layout`.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from collections.abc import Callable
from pathlib import Path

from tqdm.auto import tqdm

from warp_rlhf.algorithm import lora
from warp_rlhf.algorithm.baseline import train_reinforce, trajectory_files
from warp_rlhf.algorithm.merge import State, copy_into, lerp, model_state
from warp_rlhf.algorithm.reinforce import Prompt, Trainer
from warp_rlhf.algorithm.warp import train_warp
from warp_rlhf.checkpoint import (
    UnreadableFile,
    atomic_dir,
    load_tensors,
    read_json,
    verify_safetensors,
    write_json,
    write_text,
)
from warp_rlhf.config import WarpConfig, config_to_dict, dump_config
from warp_rlhf.errors import ConfigError, ModelError
from warp_rlhf.layout import OutputDir
from warp_rlhf.runners import RunJob, check_backend, make_runner
from warp_rlhf.stages import assets
from warp_rlhf.stages.data import Splits, make_splits, read_splits
from warp_rlhf.stages.evaluate import Judge, Samples, completion_rows, sample_policy, write_results
from warp_rlhf.stages.hub import check_hub, model_card, write_cards
from warp_rlhf.stages.models import check_loadable, context_window, load_causal_lm, load_tokenizer, model_config
from warp_rlhf.stages.output import claim
from warp_rlhf.stages.report import timed, write_report
from warp_rlhf.stages.reward import judge_scores, train_reward_models
from warp_rlhf.stages.rewards import Functions, Reward, build_reward, build_rewards, check_reward, needs_reward_stage
from warp_rlhf.stages.tracking import Tracking, require


def check_models(config: WarpConfig, functions: Functions | None = None) -> None:
    """Fail early, before anything is written, on models that cannot serve their role."""
    policy = model_config(assets.resolve_policy(config), "policy", trust_remote_code=config.trust_remote_code)
    architectures = getattr(policy, "architectures", None) or []
    if architectures and not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        raise ModelError(f"policy {config.policy} is a {architectures[0]}, not a causal language model")
    window, needed = context_window(policy), config.prompt_max_tokens + config.max_new_tokens
    if window is not None and needed > window:
        raise ConfigError(
            f"prompt_max_tokens + max_new_tokens = {needed} is out of range: the policy's context window is {window}"
        )
    _check_weights(assets.resolve_policy(config), "policy")
    check_loadable(assets.resolve_policy(config), "policy", trust_remote_code=config.trust_remote_code)
    if needs_reward_stage(config):
        backbone = model_config(
            assets.resolve_backbone(config), "reward_model", trust_remote_code=config.trust_remote_code
        )
        check_loadable(assets.resolve_backbone(config), "reward_model", trust_remote_code=config.trust_remote_code)
        heads = [a for a in getattr(backbone, "architectures", None) or [] if a.endswith("ForSequenceClassification")]
        if heads and backbone.num_labels != 1:
            raise ModelError(f"reward_model {config.reward_model} gives {backbone.num_labels} scores per text, not 1")
    for spec in [*config.reward_funcs, *([config.judge] if config.judge not in {"auto", "vader", "none"} else [])]:
        check_reward(spec, config, functions)
    for tracker in config.report_to:
        if tracker != "none":
            require(tracker)
    if config.lora_r > 0:
        lora.require_peft()
    check_hub(config)


def _check_weights(name: str, what: str) -> None:
    """A local model folder's safetensors files must be whole: found here, not after hours of work."""
    for path in sorted(Path(name).glob("*.safetensors")) if Path(name).is_dir() else []:
        try:
            verify_safetensors(path)
        except UnreadableFile as error:
            raise ModelError(f"{what} {name}: {error}") from None


def prepare_output(
    config: WarpConfig,
    *,
    overwrite: bool = False,
    config_file: str | Path | None = None,
    functions: Functions | None = None,
) -> Path:
    """Check the models, then claim `output_dir` for this config (`output.claim`) and save it.
    `config_file`: the YAML file the config was read from, which the folder must not hold;
    `functions`: the reward functions given as objects (`rewards.function_spec`)."""
    config.torch_device  # noqa: B018 (a device this machine lacks is refused before any work)
    check_models(config, functions)
    out = Path(config.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        claim(config, out, overwrite=overwrite, inputs=[("the config file", Path(config_file))] if config_file else [])
        write_text(OutputDir(out).config, dump_config(config))
    except OSError as error:
        raise ConfigError(f"output_dir {out} cannot be written: {error.strerror or error}") from None
    return out


def policy_tokenizer(config: WarpConfig):
    return load_tokenizer(assets.resolve_policy(config), trust_remote_code=config.trust_remote_code)


def load_splits(config: WarpConfig, out: Path) -> Splits:
    """The run's data splits, cut once and kept in `data/splits.json`."""
    path = OutputDir(out).splits
    if path.exists():
        return read_splits(read_json(path))
    tokenizer, pairs = policy_tokenizer(config), needs_reward_stage(config)
    backbone = (
        [load_tokenizer(assets.resolve_backbone(config), trust_remote_code=config.trust_remote_code)] if pairs else []
    )
    policy = model_config(assets.resolve_policy(config), "policy", trust_remote_code=config.trust_remote_code)
    window = context_window(policy)
    splits = make_splits(config, [*backbone, tokenizer], pairs=pairs, window=window)
    write_json(path, dataclasses.asdict(splits))
    return splits


def reward_stage(config: WarpConfig, out: Path) -> dict:
    """Train the reward model (with `reward_models` K > 1, K members and their weight average,
    WARM) unless `reward_model/` is already complete, or no reward is that model (`reward_funcs`);
    return its metrics."""
    paths = OutputDir(out)
    if not needs_reward_stage(config):
        return {"skipped": True}
    if paths.reward_metrics.exists():
        return read_json(paths.reward_metrics) | {"reused": True}
    splits = load_splits(config, out)
    with timed(out, "reward model"):
        metrics = train_reward_models(
            config, assets.resolve_backbone(config), splits.reward_train, splits.reward_eval, out
        )
    with tracking(config, out) as tracked:
        tracked.log("reward_model", metrics, 0)
    return metrics


def trainer_from_folders(
    config: WarpConfig,
    policy_path: str,
    out: str,
    prompts: list[Prompt],
    functions: Functions | None = None,
    device: str | None = None,
) -> Trainer:
    """A `Trainer` rebuilt from the policy's folder and the output folder (a run's own process), on
    `device` (None: the config's `torch_device`; a Ray task's is that of the GPUs Ray gave it)."""
    device = device or config.torch_device
    policy = load_causal_lm(policy_path, trust_remote_code=config.trust_remote_code).to(device)
    tokenizer = load_tokenizer(policy_path, padding_side="left", trust_remote_code=config.trust_remote_code)
    rewards = build_rewards(config, Path(out), tokenizer, device, functions)
    return Trainer(config, policy, tokenizer, rewards, prompts, log_step=tracking(config, Path(out)))


def tracking(config: WarpConfig, out: Path) -> Tracking:
    """The trackers of `report_to` for this output folder (none: a `Tracking` that logs nothing)."""
    return Tracking(config.report_to, out, config_to_dict(config))


def build_judge(config: WarpConfig, out: Path, tokenizer, splits: Splits) -> Judge | None:
    """The evaluation's independent score: VADER for review data (`judge: auto`), or as configured."""
    spec = config.judge if config.judge != "auto" else ("vader" if splits.kind == "reviews" else "none")
    if spec == "none":
        return None
    if spec == "vader":
        return lambda prompts, completions: judge_scores(
            [p.text + c for p, c in zip(prompts, completions, strict=True)]
        )
    reward = Reward(spec, 1.0, build_reward(spec, config, out, tokenizer, config.torch_device))
    return lambda prompts, completions: reward(prompts, completions).tolist()


def _stage_inputs(config: WarpConfig, out: Path, functions: Functions | None = None):
    """(SFT policy on its device, its tokenizer, the rewards, splits), training the reward model if needed."""
    reward_stage(config, out)
    splits = load_splits(config, out)
    device = config.torch_device
    policy_path = assets.resolve_policy(config)
    policy = load_causal_lm(policy_path, trust_remote_code=config.trust_remote_code).to(device)
    tokenizer = load_tokenizer(policy_path, padding_side="left", trust_remote_code=config.trust_remote_code)
    return policy, tokenizer, build_rewards(config, out, tokenizer, device, functions), splits


def train_stage(config: WarpConfig, out: Path, *, resume: bool = False, functions: Functions | None = None) -> Path:
    """Train `config.method` (WARP, or the REINFORCE baseline); return its final policy folder."""
    paths, warp = OutputDir(out), config.method == "warp"
    final = paths.final if warp else paths.baseline_final
    if (final / "config.json").exists():
        return final
    started = any(out.glob("iter_*")) if warp else paths.baseline.path.exists()
    if started and not resume:
        raise ConfigError(
            f"output_dir {out} holds an unfinished {config.method} run: pass --resume to continue it "
            "(or start afresh in another output_dir)"
        )
    if warp:
        check_backend(config)
    policy, tokenizer, reward, splits = _stage_inputs(config, out, functions)
    with timed(out, f"train {config.method}"), tracking(config, out) as tracked:
        trainer = None
        if config.backend == "local" or not warp:
            trainer = Trainer(config, policy, tokenizer, reward, splits.rl_prompts, log_step=tracked)
        if warp:
            factory = functools.partial(
                trainer_from_folders,
                config,
                assets.resolve_policy(config),
                str(out.resolve()),
                splits.rl_prompts,
                functions,
            )
            runner = make_runner(config.backend, RunJob(config, factory), trainer)
            merged, summaries = train_warp(config, model_state(policy), paths, runner)  # θ_sft, saved first
            metrics: dict = {"iterations": summaries}
        else:
            trajectory = train_reinforce(trainer, paths.baseline)
            merged = load_tensors(trajectory[-1][1])
            metrics = read_json(paths.baseline.done)
        sft = load_tensors(paths.init(1)) if warp and config.save_adapter else None
        save_policy(policy, tokenizer, merged, final, config, metrics, sft=sft)
    return final


def save_policy(
    policy, tokenizer, state: State, folder: Path, config: WarpConfig, metrics: dict, *, sft: State | None = None
) -> None:
    """`save_pretrained` of the policy with `state` (LoRA's merged: it loads as a plain model), its
    tokenizer and a model card, atomically; with `save_adapter`, also adapter/ on θ_sft (`sft`)."""
    adapter = None
    if config.lora_r > 0 and config.save_adapter and sft is not None:
        adapter = lora.adapter_of(state, sft, copy.deepcopy(policy), config)
    copy_into(policy, {name: t.to(next(policy.parameters()).device) for name, t in state.items()})
    with atomic_dir(folder) as tmp:
        policy.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if adapter is not None:
            adapter.save_pretrained(tmp / "adapter")
        write_json(tmp / "training_metrics.json", metrics)
        (tmp / "README.md").write_text(model_card(config, metrics, folder))


def evaluation_points(config: WarpConfig, out: Path, sft: State) -> list[tuple[str, dict, Callable[[], State]]]:
    """(name, description, weights) of every policy to evaluate: SFT, the LITI front of the WARP
    policy (ν = 1 is `warp`), WARP's earlier iterations θ_slerp^i, and the baseline's trajectory."""
    paths = OutputDir(out)
    points: list[tuple[str, dict, Callable[[], State]]] = [("sft", {"kind": "sft", "nu": 0.0}, lambda: sft)]
    if (paths.final / "config.json").exists():
        warp = {
            k: v.to(next(iter(sft.values())).device) for k, v in model_state(load_causal_lm(str(paths.final))).items()
        }
        for index in range(1, config.front_points):
            nu = round(index / (config.front_points - 1), 4)
            name = "warp" if index == config.front_points - 1 else f"liti_{nu:g}"
            points.append((name, {"kind": "liti", "nu": nu}, lambda nu=nu: {k: lerp(sft[k], warp[k], nu) for k in sft}))
        for i in range(1, config.iterations):
            path = paths.slerp(i)
            points.append((f"iter_{i}", {"kind": "iteration", "iteration": i}, lambda p=path: load_tensors(p)))
    if paths.baseline.done.exists():
        for step, path in trajectory_files(config, paths.baseline):
            points.append((f"reinforce_{step}", {"kind": "reinforce", "step": step}, lambda p=path: load_tensors(p)))
    return points


def evaluate_stage(config: WarpConfig, out: Path, functions: Functions | None = None) -> dict:
    """Evaluate every available policy on the held-out prompts; write eval/ and report.md."""
    paths = OutputDir(out)
    warp, baseline = (paths.final / "config.json").exists(), paths.baseline.done.exists()
    if not (warp or baseline):
        raise ConfigError(
            f"output_dir {out} holds no trained policy to evaluate (no final/, no reinforce/): "
            "run `warp-rlhf train` (and `--method reinforce` for the baseline) first, or `warp-rlhf run`"
        )
    with timed(out, "evaluate"):
        evaluated = evaluate_points(config, out, lambda sft: evaluation_points(config, out, sft), paths, functions)
    results = write_results(evaluated, paths.eval, out)
    report = write_report(out, dump_config(config), results)
    write_cards(config, out, results["policies"])
    with tracking(config, out) as tracked:
        if tracked:
            for name, row in results["policies"].items():
                tracked.log("evaluation", {f"{name}/{key}": value for key, value in row.items()}, 0)
            tracked.text("evaluation", "report", report.read_text())
            if config.log_completions:  # each policy's table of completions, as eval/completions.jsonl holds them
                for name, rows in completion_rows(evaluated).items():
                    tracked.table("evaluation", f"completions/{name}", rows, 0)
    return results


def evaluate_points(
    config: WarpConfig,
    out: Path,
    points: Callable[[State], list[tuple[str, dict, Callable[[], State]]]],
    cache: OutputDir,
    functions: Functions | None = None,
) -> dict[str, tuple[dict, Samples]]:
    """Sample every policy of `points(θ_sft)` on the held-out prompts of `out` with the same seeds,
    scored against the SFT policy: name → (description, per-prompt values). Each policy's values
    are kept in `cache.evaluated(name)`, so an interrupted evaluation resumes."""
    sft_model, tokenizer, rewards, splits = _stage_inputs(config, out, functions)
    judge = build_judge(config, out, tokenizer, splits)
    sft_model.eval()
    device = next(sft_model.parameters()).device
    policy = copy.deepcopy(sft_model)
    sft = {k: v.detach().clone() for k, v in model_state(sft_model).items()}
    evaluated = {}
    for name, meta, weights in tqdm(points(sft), desc="Evaluating policies", unit="policy"):
        cached = cache.evaluated(name)
        if cached.exists():
            saved = read_json(cached)
            evaluated[name] = (saved["meta"], Samples(**saved["samples"]))
            continue
        evaluated_model = sft_model if name == "sft" else policy  # the SFT policy's KL is 0 by definition
        if name != "sft":
            copy_into(policy, {k: v.to(device) for k, v in weights().items()})
        samples = sample_policy(
            evaluated_model, sft_model, tokenizer, splits.eval_prompts, temperature=config.temperature,
            max_new_tokens=config.max_new_tokens, seed=config.seed, rewards=rewards, judge=judge,
        )  # fmt: skip
        write_json(cached, {"meta": meta, "samples": dataclasses.asdict(samples)})
        evaluated[name] = (meta, samples)
    return evaluated
