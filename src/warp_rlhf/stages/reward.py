"""The reward r(x, y): a Bradley–Terry reward model, and the independent VADER judge.

Training minimises −log σ(r(chosen) − r(rejected)) over (positive, negative) review pairs
with TRL's `RewardTrainer` (pre-tokenised pairs, since TRL appends an EOS token that BERT
tokenizers lack). The held-out metric is pairwise accuracy: P[r(chosen) > r(rejected)].

WARM (Ramé et al., 2024, "WARM: On the Benefits of Weight Averaged Reward Models"): with
`reward_models` K > 1, K members are fine-tuned from the same initialisation — the backbone and
one score head, drawn with `seed` — each seeing the pairs in its own order (member k's seed
`seed + k − 1`) and optionally with its own learning rate (`reward_learning_rates`); the reward
model is their uniform weight average θ_WARM = (1/K) Σ_k θ_k. A shared start is what lets weights
average: members whose heads start from independent random draws average into a head whose
scores shrink towards zero. ENS, the paper's baseline, averages the members' scores instead, at K
forwards per text (`EnsembleRewardModel`).
"""

from __future__ import annotations

import contextlib
import random
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from warp_rlhf.algorithm.reinforce import derived_seed
from warp_rlhf.checkpoint import UnreadableFile, atomic_dir, read_json, save_tensors, verify_safetensors, write_json
from warp_rlhf.config import WarpConfig
from warp_rlhf.errors import ModelError
from warp_rlhf.layout import REWARD_METRICS, OutputDir
from warp_rlhf.stages.models import context_window, load_tokenizer, loading, model_config


def text_limit(model_config, tokenizer) -> int:
    """The most tokens a text keeps: the tokenizer's limit, the model's positions, and 512 at most
    (longer texts are truncated, as an encoder cannot read past its position embeddings)."""
    positions = context_window(model_config) or 512
    if getattr(model_config, "model_type", None) in {"roberta", "xlm-roberta", "camembert"}:
        positions -= 2  # their first two positions are reserved (padding offset)
    return min(tokenizer.model_max_length, positions, 512)


class RewardModel:
    """Scores texts with one output of a sequence-classification model, used as it is.

    A model with one output is scored by it; a model with several needs `output`, a label name
    (as in its `id2label`, any case) or an index: never a silent `logits[:, 0]`, which for the
    classic two-label IMDB classifier is its NEGATIVE score.
    """

    def __init__(
        self, model, tokenizer, *, output: str | None = None, batch_size: int = 64, name: str = "reward model"
    ):
        self.index = output_index(model.config, output, name)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = text_limit(model.config, tokenizer)

    @classmethod
    def from_pretrained(
        cls, path: str | Path, *, output: str | None = None, device: str = "cpu", trust_remote_code: bool = False
    ):
        from transformers import AutoModelForSequenceClassification

        tokenizer = load_tokenizer(str(path), trust_remote_code=trust_remote_code)
        with loading(str(path), "reward model"):
            model = AutoModelForSequenceClassification.from_pretrained(str(path), trust_remote_code=trust_remote_code)
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        return cls(model.to(device), tokenizer, output=output, name=f"reward model {path}")

    @torch.no_grad()
    def score(self, texts: list[str]) -> torch.Tensor:
        """r(text) for each text, as a float32 CPU tensor."""
        device = next(self.model.parameters()).device
        scores = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(
                texts[start : start + self.batch_size],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(device)
            scores.append(self.model(**batch).logits[:, self.index].float().cpu())
        return torch.cat(scores) if scores else torch.empty(0)


class EnsembleRewardModel:
    """ENS: the mean of the members' scores, (1/K) Σ_k r_k(text), at K forwards per text; the
    members share the backbone's tokenizer, so `tokenizer` is the first one's."""

    def __init__(self, members: list[RewardModel]):
        self.members = members
        self.tokenizer = members[0].tokenizer

    def score(self, texts: list[str]) -> torch.Tensor:
        """The members' mean r(text) for each text, as a float32 CPU tensor."""
        return torch.stack([member.score(texts) for member in self.members]).mean(0)


def trained_reward(config: WarpConfig, out: Path, device: str = "cpu") -> RewardModel | EnsembleRewardModel:
    """The reward stage's model in `out`: `reward_model/` (with K > 1 the weight average, WARM), or
    with `reward_ensemble: ens` the mean of the K members' scores (ENS)."""
    paths = OutputDir(out)
    if config.reward_ensemble == "ens" and config.reward_models > 1:
        return _ensemble(config, paths, device)
    return _load(config, paths.reward_model, device)


def _ensemble(config: WarpConfig, paths: OutputDir, device: str) -> EnsembleRewardModel:
    members = range(1, config.reward_models + 1)
    return EnsembleRewardModel([_load(config, paths.reward_member(k), device) for k in members])


def _load(config: WarpConfig, path: Path, device: str) -> RewardModel:
    return RewardModel.from_pretrained(path, device=device, trust_remote_code=config.trust_remote_code)


def output_index(config, output: str | None, name: str) -> int:
    """The logit that is the reward: the only one, or the one `output` names (a label or an index)."""
    labels = [str(config.id2label.get(i, i)) for i in range(config.num_labels)]
    if output is None:
        if config.num_labels == 1:
            return 0
        raise ModelError(
            f"{name} gives {config.num_labels} scores per text ({', '.join(labels)}): choose the reward as "
            f"{name.split()[-1]}[{labels[-1]}]"
        )
    if output.isdigit() and int(output) < config.num_labels:
        return int(output)
    by_name = {label.lower(): i for i, label in enumerate(labels)}
    if output.lower() not in by_name:
        raise ModelError(f"{name} has no output '{output}' (its outputs: {', '.join(labels)})")
    return by_name[output.lower()]


def pairwise_accuracy(reward: RewardModel | EnsembleRewardModel, pairs: list[tuple[str, str]]) -> float:
    """Fraction of pairs where the chosen text scores strictly above the rejected one."""
    chosen, rejected = zip(*pairs, strict=True)
    return (reward.score(list(chosen)) > reward.score(list(rejected))).float().mean().item()


def reward_details(metrics: dict) -> str:
    """What a trained reward model's metrics add to its held-out accuracy, as " (…)" for the
    report and the `reward` command: the members' accuracies and ENS's when it is a weight
    average (WARM), and the training pairs swapped; "" when there is neither."""
    parts, members = [], metrics.get("members")
    if members:
        each = ", ".join(f"{member['eval_pairwise_accuracy']:.3f}" for member in members)
        ens = metrics["ens_eval_pairwise_accuracy"]
        parts += [f"weight average of {len(members)} members at {each}", f"ENS {ens:.3f}"]
    if metrics.get("swapped_pairs"):
        parts.append(f"{metrics['swapped_pairs']} of {metrics['train_pairs']} training pairs swapped")
    return f" ({'; '.join(parts)})" if parts else ""


def judge_scores(texts: list[str]) -> list[float]:
    """The independent judge: VADER's compound sentiment score in [−1, 1]."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    analyzer = SentimentIntensityAnalyzer()
    return [analyzer.polarity_scores(text)["compound"] for text in texts]


def swap_labels(pairs: list[tuple[str, str]], fraction: float, seed: int) -> tuple[list[tuple[str, str]], int]:
    """`pairs` with round(fraction · n) of them, drawn with `seed`, swapped (chosen ↔ rejected):
    corrupted preference labels, as in WARM's robustness experiments; and how many were swapped."""
    swapped = set(random.Random(seed).sample(range(len(pairs)), round(fraction * len(pairs))))
    return [(b, a) if i in swapped else (a, b) for i, (a, b) in enumerate(pairs)], len(swapped)


def member_seed(config: WarpConfig, member: int) -> int:
    """Member k's seed of its data order, `seed + k − 1`: member 1 is the model `reward_models: 1` trains."""
    return config.seed + member - 1


def member_learning_rate(config: WarpConfig, member: int) -> float:
    """Member k's entry of `reward_learning_rates`, or `reward_learning_rate` when none are given."""
    rates = config.reward_learning_rates
    return rates[member - 1] if rates is not None else config.reward_learning_rate


def train_reward_models(
    config: WarpConfig,
    backbone: str,
    train_pairs: list[tuple[str, str]],
    eval_pairs: list[tuple[str, str]],
    out: Path,
) -> dict:
    """The reward stage: one model into `reward_model/`, or with `reward_models` K > 1 the K
    members into `reward_members/` (a finished one reused, so an interrupted member retrains
    alone) and then their weight average into `reward_model/` (WARM); its metrics."""
    paths = OutputDir(out)
    if config.reward_models == 1:
        return train_reward_model(config, backbone, train_pairs, eval_pairs, paths.reward_model)
    members = [
        read_json(paths.reward_member(k) / REWARD_METRICS)
        if (paths.reward_member(k) / REWARD_METRICS).exists()
        else train_reward_model(config, backbone, train_pairs, eval_pairs, paths.reward_member(k), member=k)
        for k in range(1, config.reward_models + 1)
    ]
    return average_reward_models(config, members, eval_pairs, paths)


def average_reward_models(
    config: WarpConfig, members: list[dict], eval_pairs: list[tuple[str, str]], paths: OutputDir
) -> dict:
    """Write `reward_model/`: the members' weight average, their config and tokenizer (member 1's),
    and metrics.json (last) with each member's metrics under `members` and the held-out pairwise
    accuracy of the average and of ENS at the top level."""
    started = time.perf_counter()
    folders = [paths.reward_member(k) for k in range(1, len(members) + 1)]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with atomic_dir(paths.reward_model) as tmp:
        average_weights(folders, tmp)
        first = members[0]
        metrics = {
            **{key: first[key] for key in ("train_pairs", "eval_pairs", "backbone", "swapped_pairs")},
            "eval_pairwise_accuracy": pairwise_accuracy(_load(config, tmp, device), eval_pairs),
            "ens_eval_pairwise_accuracy": pairwise_accuracy(_ensemble(config, paths, device), eval_pairs),
            "members": members,
            "seconds": sum(member["seconds"] for member in members) + time.perf_counter() - started,
        }
        write_json(tmp / REWARD_METRICS, metrics)
    return metrics


def average_weights(folders: list[Path], output: Path) -> None:
    """Write into `output` the uniform average (1/K) Σ_k θ_k of the K model folders' weights,
    every safetensors file tensor by tensor (one tensor of each member in memory, as the SLERP
    merge reads its runs), and the first folder's other files (config, tokenizer) as they are."""
    for path in sorted(folders[0].iterdir()):
        if path.suffix == ".safetensors":
            _average_file([folder / path.name for folder in folders], output / path.name)
        elif path.is_file() and path.name != REWARD_METRICS:
            shutil.copy2(path, output / path.name)


def _average_file(files: list[Path], output: Path) -> None:
    for file in files:
        try:
            verify_safetensors(file)
        except UnreadableFile as error:
            raise ModelError(f"{error}; delete {file.parent} and run again to train this member anew") from None
    handles = [safe_open(str(file), framework="pt") for file in files]
    names = handles[0].keys()
    for file, handle in zip(files[1:], handles[1:], strict=True):
        if handle.keys() != names:
            raise ModelError(f"{file} holds other tensors than {files[0]}: the members must share one backbone")
    save_tensors(output, {name: _mean([h.get_tensor(name) for h in handles]) for name in names}, handles[0].metadata())


def _mean(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The members' mean of a float tensor, in its dtype; any other tensor (ids, masks) is the first's."""
    if not tensors[0].is_floating_point():
        return tensors[0]
    return torch.stack([t.float() for t in tensors]).mean(0).to(tensors[0].dtype)


def train_reward_model(
    config: WarpConfig,
    backbone: str,
    train_pairs: list[tuple[str, str]],
    eval_pairs: list[tuple[str, str]],
    output: Path,
    member: int = 1,
) -> dict:
    """Train a Bradley–Terry reward model (member `member` of `reward_models`) and save it
    (model, tokenizer, metrics) to `output`.

    The folder appears only when complete; its `metrics.json` holds held-out pairwise accuracy.
    TRL loads the backbone and draws the new score head after seeding with `seed`, the same for
    every member; the member's seed (`member_seed`) orders the pairs. The caller's global RNGs are
    put back afterwards. A `reward_label_noise` fraction of `train_pairs` is swapped,
    the same pairs for every member; `eval_pairs` stay clean.
    """
    with global_rng_kept():
        return _train_reward_model(config, backbone, train_pairs, eval_pairs, output, member)


@contextlib.contextmanager
def global_rng_kept() -> Iterator[None]:
    """Python's, NumPy's and torch's global RNGs as they were on entry, on exit: HF's Trainer
    seeds all three with its `seed`."""
    python, numpy = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=list(range(torch.cuda.device_count()))):
            yield
    finally:
        random.setstate(python)
        np.random.set_state(numpy)


def _train_reward_model(
    config: WarpConfig,
    backbone: str,
    train_pairs: list[tuple[str, str]],
    eval_pairs: list[tuple[str, str]],
    output: Path,
    member: int,
) -> dict:
    from datasets import Dataset
    from trl import RewardConfig

    started = time.perf_counter()
    tokenizer = load_tokenizer(backbone, trust_remote_code=config.trust_remote_code)
    backbone_config = model_config(backbone, "reward_model", trust_remote_code=config.trust_remote_code)
    max_length = text_limit(backbone_config, tokenizer)

    def ids(texts: list[str]) -> list[list[int]]:
        return tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]

    seed = member_seed(config, member)
    train_pairs, swapped = swap_labels(train_pairs, config.reward_label_noise, derived_seed(config.seed, "label_noise"))
    chosen, rejected = (list(column) for column in zip(*train_pairs, strict=True))
    dataset = Dataset.from_dict({"chosen_ids": ids(chosen), "rejected_ids": ids(rejected)})
    use_cpu = not torch.cuda.is_available()
    with atomic_dir(output) as tmp:
        args = RewardConfig(
            output_dir=str(tmp / "trainer"),
            num_train_epochs=config.reward_epochs,
            per_device_train_batch_size=config.reward_batch_size,
            learning_rate=member_learning_rate(config, member),
            lr_scheduler_type="linear",
            warmup_steps=0.05,
            seed=config.seed,  # the score head's initialisation (and dropout): one for every member
            data_seed=seed,  # the member's order of the pairs
            model_init_kwargs={"dtype": "auto", "device_map": None, "trust_remote_code": config.trust_remote_code},
            use_cpu=use_cpu,
            bf16=False,
            activation_checkpointing=False,
            save_strategy="no",
            report_to="none",
            logging_steps=25,
            max_length=None,
            dataloader_num_workers=0,
        )
        trainer = _reward_trainer(backbone, args, dataset, tokenizer)
        result = trainer.train()
        shutil.rmtree(tmp / "trainer", ignore_errors=True)
        scorer = RewardModel(trainer.model.eval(), tokenizer)
        metrics = {
            "eval_pairwise_accuracy": pairwise_accuracy(scorer, eval_pairs),
            "train_pairwise_accuracy_sample": pairwise_accuracy(scorer, train_pairs[: len(eval_pairs)]),
            "train_loss": result.training_loss,
            "train_pairs": len(train_pairs),
            "swapped_pairs": swapped,
            "seed": seed,
            "learning_rate": member_learning_rate(config, member),
            "eval_pairs": len(eval_pairs),
            "backbone": backbone,
            "seconds": time.perf_counter() - started,
        }
        trainer.model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / REWARD_METRICS, metrics)
    return metrics


def _reward_trainer(backbone: str, args, dataset, tokenizer):
    """TRL's `RewardTrainer` on the backbone with a new one-output head (its load report hushed)."""
    from transformers.utils import logging as hf_logging
    from trl import RewardTrainer

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # silence "newly initialised head" for the score layer
    try:
        with loading(backbone, "reward_model"):
            return RewardTrainer(model=backbone, args=args, train_dataset=dataset, processing_class=tokenizer)
    finally:
        hf_logging.set_verbosity(verbosity)
