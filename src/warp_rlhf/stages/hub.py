"""A trained policy's model card, and `push_to_hub`: final/ to the Hugging Face Hub, as TRL does.

The card (`README.md` of final/ and of reinforce/final/) is what TRL writes for a trained model:
hub metadata (`base_model`, `datasets`, `tags`, `pipeline_tag`, read by `huggingface_hub.ModelCard`),
the base model, the method and its settings (I, M, T, μ, η, λ, β), the rewards and their weights,
the datasets, and once the policies are evaluated, the evaluation table (reward ± s.e., KL to
the SFT policy). `push_to_hub` uploads final/ with `huggingface_hub` to `hub_model_id` (default:
output_dir's folder name); offline or without a token it fails in one line before any work, and
a push that fails after training leaves the trained policy where it is.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import re
from pathlib import Path

from warp_rlhf.algorithm.baseline import total_steps
from warp_rlhf.checkpoint import read_json, write_text
from warp_rlhf.config import EMBEDDED, WarpConfig, dump_config
from warp_rlhf.errors import WarpError
from warp_rlhf.layout import OutputDir
from warp_rlhf.stages.plots import cell
from warp_rlhf.stages.rewards import TRAINED, Reward, needs_reward_stage, specs

EMBEDDED_SOURCES = {
    "policy": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "reward_model": "sentence-transformers/all-MiniLM-L6-v2",
    "dataset": "stanfordnlp/imdb",
}
"""The hub names of what the embedded default ships (`stages.assets`)."""
_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
_TRUE = {"1", "ON", "YES", "TRUE"}
PAPER = "[WARP](https://arxiv.org/abs/2406.16768) (Ramé et al., 2024)"


class HubError(WarpError):
    """The hub cannot take the policy: offline, no token, a refused or failed upload."""


# ---- the model card ------------------------------------------------------------------------
def hub_name(value: str | None, role: str) -> str | None:
    """`value` as a hub name (the embedded default's source for 'embedded'), or None for a local
    path or file."""
    if value == EMBEDDED:
        return EMBEDDED_SOURCES.get(role)
    if not value or value.startswith((".", "/", "~")) or Path(value).exists() or not _HUB_NAME.fullmatch(value):
        return None
    return value


def _shown(value: str, role: str) -> str:
    """A hub name as a link; a local path or file by its last part, which reads the same anywhere."""
    name = hub_name(value, role)
    if name is None:
        return f"`{Path(value).name}`"
    kind = "datasets/" if role.endswith("dataset") else ""
    return f"[{name}](https://huggingface.co/{kind}{name})"


def repo_id(config: WarpConfig) -> str:
    """The hub repository of `push_to_hub`: `hub_model_id`, else output_dir's folder name (TRL's rule)."""
    return config.hub_model_id or Path(config.output_dir).resolve().name


def model_card(config: WarpConfig, metrics: dict, folder: Path, policies: dict | None = None) -> str:
    """The card of the policy `config.method` trained into `folder`: hub metadata, how it was
    trained, and with `policies` (eval/results.json's) the evaluation table."""
    warp = config.method == "warp"
    where = repo_id(config) if warp and config.push_to_hub else str(folder)
    sections = [
        f"---\n{_metadata(config)}\n---\n",
        f"# {'WARP policy' if warp else 'REINFORCE baseline policy'}\n",
        f"This model is a fine-tuned version of {_shown(config.policy, 'policy')}, trained with warp-rlhf: "
        f"{_method(config)}.\n",
        "## Quick start\n\n```python\nfrom transformers import pipeline\n\n"
        f'generator = pipeline("text-generation", model="{where}")\n'
        'print(generator("Once upon a time", max_new_tokens=32)[0]["generated_text"])\n```\n',
        "## Training procedure\n\n" + _settings(config),
        "### Rewards\n\n" + _rewards(config),
        "### Datasets\n\n" + _datasets(config),
    ]
    if policies:
        sections.append("## Evaluation\n\n" + _evaluation(config, policies, "warp" if warp else _baseline_name(config)))
    sections += [
        f"### Config\n\n```yaml\n{dump_config(config)}```\n",
        f"### Training metrics\n\n```json\n{json.dumps(metrics, indent=2)}\n```\n",
        "### Framework versions\n\n" + "".join(f"- {name}: {_version(name)}\n" for name in _FRAMEWORKS),
    ]
    return "\n".join(sections)


def _metadata(config: WarpConfig) -> str:
    """The card's YAML header, as the hub reads it (`huggingface_hub.ModelCardData`)."""
    from huggingface_hub import ModelCardData

    warp = config.method == "warp"
    datasets = {hub_name(getattr(config, role), "dataset") for role in _dataset_uses(config)} - {None}
    return ModelCardData(
        base_model=hub_name(config.policy, "policy"),
        datasets=sorted(datasets) or None,
        library_name="transformers",
        model_name=repo_id(config).rsplit("/", 1)[-1] + ("" if warp else "-reinforce"),
        pipeline_tag="text-generation",
        tags=[*(["warp"] if warp else []), "rlhf", "reinforce", "warp-rlhf", "trl-compatible"],
    ).to_yaml()


_FRAMEWORKS = ("warp-rlhf", "transformers", "torch", "huggingface_hub")


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _method(config: WarpConfig) -> str:
    if config.method == "warp":
        return (
            f"{PAPER}, Weight Averaged Rewarded Policies (paper Algorithm 1; I={config.iterations}, M={config.runs}, "
            f"T={config.steps}, μ={config.ema_rate}, η={config.liti_rate}, λ={config.resolved_slerp_lambda:g}, "
            f"β={config.beta})"
        )
    return (
        f"the REINFORCE baseline of the comparisons in {PAPER}, for the I·M·T = {total_steps(config)} steps of "
        f"WARP's runs together (β={config.beta})"
    )


def _table(header: tuple[str, ...], rows: list[tuple]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(value) for value in row) + " |" for row in rows]) + "\n"


def _settings(config: WarpConfig) -> str:
    common = [
        ("β", "KL regularisation: r − β (log π − log π_anchor)", config.beta),
        ("B", "completions per step", config.batch_size),
        ("learning rate", "Adam", config.learning_rate),
        ("τ", "sampling temperature", config.temperature),
        ("L", "longest completion, tokens", config.max_new_tokens),
    ]
    if config.method == "warp":
        rows = [
            ("I", "iterations", config.iterations),
            ("M", "REINFORCE runs per iteration, merged by SLERP", config.runs),
            ("T", "steps per run", config.steps),
            ("μ", f"EMA rate of the anchor ({config.anchor} anchor)", config.ema_rate),
            ("λ", f"merge weight ({config.merge_method})", f"{config.resolved_slerp_lambda:g}"),
            ("η", "LITI rate towards the merged policy", config.liti_rate),
            *common,
        ]
    else:
        anchor = ("anchor", "of the KL term (sft: fixed at the SFT policy; ema: rate μ)", config.baseline_anchor)
        rows = [("steps", "I·M·T", total_steps(config)), anchor, *common]
    return _table(("setting", "meaning", "value"), rows)


def _rewards(config: WarpConfig) -> str:
    weights = config.reward_weights or [1.0] * len(specs(config))
    rows = []
    for spec, weight in zip(specs(config), weights, strict=True):
        what = f"`{Reward(spec, weight, None).key}`"  # its name in the evaluation's results
        model, _, output = spec.removesuffix("]").partition("[")
        if spec == TRAINED:
            what += f": a Bradley–Terry reward model on {_shown(config.reward_model, 'reward_model')}"
        elif hub_name(model, "reward"):
            what += f": the classifier {_shown(model, 'reward')}" + (f", output `{output}`" if output else "")
        rows.append((what, f"{weight:g}"))
    return "r = Σ_k w_k r_k:\n\n" + _table(("reward", "weight"), rows)


def _dataset_uses(config: WarpConfig) -> dict[str, list[str]]:
    """Each dataset field that was read → what it gave."""
    uses = {"dataset": ["RL prompts"]}
    uses.setdefault("eval_dataset" if config.eval_dataset else "dataset", []).append("held-out prompts")
    if needs_reward_stage(config):
        uses.setdefault("reward_dataset" if config.reward_dataset else "dataset", []).append("preference pairs")
    return uses


def _datasets(config: WarpConfig) -> str:
    lines = []
    for role, what in _dataset_uses(config).items():
        uses = " and ".join([", ".join(what[:-1]), what[-1]] if len(what) > 1 else what)
        lines.append(f"- {uses}: {_shown(getattr(config, role), 'dataset')}\n")
    return "".join(lines)


def _baseline_name(config: WarpConfig) -> str:
    """The evaluated policy that is the baseline's end of training (`reinforce_<I·M·T>`)."""
    return f"reinforce_{total_steps(config)}"


def _evaluation(config: WarpConfig, policies: dict, name: str) -> str:
    """SFT and this policy on the held-out prompts: reward (and each reward), judge, KL, mean ± s.e."""
    shown = [row for row in ("sft", name) if row in policies]
    first = policies[shown[-1]]
    parts = [key.removesuffix("_mean") for key in first if re.fullmatch(r"reward_.+_mean", key)]
    metrics = ["reward", *parts, *(["judge"] if "judge_mean" in first else []), "kl_exact"]
    header = ("policy", *("KL to SFT" if m == "kl_exact" else f"`{m[7:]}`" if m in parts else m for m in metrics))
    note = (
        f"{int(first['n_prompts'])} held-out prompts, one completion each at τ = {config.temperature}, the same "
        "prompts and seeds for every policy; KL(π ‖ π_sft) by the exact per-token estimator; mean ± s.e.\n\n"
    )
    return note + _table(header, [(row, *(cell(policies[row], m) for m in metrics)) for row in shown])


def write_cards(config: WarpConfig, out: Path, policies: dict) -> None:
    """Rewrite the card of every trained policy in `out` with the evaluation table (atomically)."""
    paths = OutputDir(out)
    for method, folder in (("warp", paths.final), ("reinforce", paths.baseline_final)):
        if (folder / "config.json").exists():
            metrics = read_json(folder / "training_metrics.json")
            card = model_card(dataclasses.replace(config, method=method), metrics, folder, policies)
            write_text(folder / "README.md", card)


# ---- the push ------------------------------------------------------------------------------
def _offline() -> bool:
    from huggingface_hub import constants

    flags = (os.environ.get(name, "").upper() for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return bool(constants.HF_HUB_OFFLINE) or any(flag in _TRUE for flag in flags)


def check_hub(config: WarpConfig) -> None:
    """With `push_to_hub`, fail before any work where the push cannot succeed (`ready_to_push`)."""
    if config.push_to_hub:
        ready_to_push(config)


def ready_to_push(config: WarpConfig) -> None:
    """One line where a push cannot succeed: offline mode, no token, a repository name the hub refuses."""
    import huggingface_hub
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if _offline():
        raise HubError(
            "push_to_hub: the hub cannot be reached (offline: HF_HUB_OFFLINE is set): unset it or set push_to_hub false"
        )
    try:
        validate_repo_id(repo_id(config))
    except HFValidationError:
        raise HubError(f"push_to_hub: {repo_id(config)!r} is not a hub repository name: set hub_model_id") from None
    if huggingface_hub.get_token() is None:
        raise HubError("push_to_hub: no Hugging Face token: log in with `hf auth login` or set HF_TOKEN")


def push_final(config: WarpConfig, out: Path, message: str) -> str | None:
    """Upload final/ to `repo_id(config)` (created if needed) with commit `message`; its URL, or
    None when there is no final/ yet. Files the hub already holds are not sent again."""
    from huggingface_hub import HfApi

    final = OutputDir(out).final
    if not (final / "config.json").exists():
        return None
    ready_to_push(config)
    try:
        api = HfApi()
        url = api.create_repo(repo_id(config), exist_ok=True)  # a bare name: in the token's namespace
        api.upload_folder(repo_id=url.repo_id, folder_path=final, commit_message=message)
    except Exception as error:  # the hub client's errors differ by version and HTTP library: one line each
        raise HubError(f"push_to_hub: {_failure(error)}: the trained policy is in {final}") from None
    return f"https://huggingface.co/{url.repo_id}"


def _failure(error: Exception) -> str:
    """Why a push failed, in a few words: the hub's answer, or that it could not be reached."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if isinstance(error, OfflineModeIsEnabled):
        return "the hub cannot be reached (offline)"
    first = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
    if isinstance(error, HfHubHTTPError):
        return f"the hub refused it ({first})"
    return f"the hub cannot be reached ({type(error).__name__}: {first})"
