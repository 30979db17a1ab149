"""`WarpTrainer`: WARP from Python, with TRL's names, over objects in memory.

    trainer = WarpTrainer(model, reward_funcs=[f], args=WarpConfig(...), train_dataset=ds)
    model = trainer.train()           # as GRPOTrainer(model=…, reward_funcs=…, args=…, train_dataset=…)
    results = trainer.evaluate()
    trainer.save_model("my-policy")
    trainer.push_to_hub()             # final/ to args.hub_model_id (args.push_to_hub: after train too)

It is the command line's code path: objects become what a config names. A model object is saved
once to `output_dir/inputs/<role>-<fingerprint>/` (with its tokenizer), a `datasets.Dataset` to
`inputs/<role>-<fingerprint>.jsonl`, and a function stays an object, named `<name>@<fingerprint>`
in `reward_funcs` and handed to every run (processes and Ray get it by value, through
cloudpickle). The fingerprints are of what the objects are — weights, rows, source — so running a
notebook cell again with the same objects resumes, and a changed object is a changed setting that
the resume rules judge. Then the stages run as `warp-rlhf run` runs them: the lock on
`output_dir`, its record of what it wrote, reports, plots and tracking are the same.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from warp_rlhf.checkpoint import atomic_dir
from warp_rlhf.config import WarpConfig
from warp_rlhf.errors import ConfigError, ModelError
from warp_rlhf.layout import OutputDir
from warp_rlhf.stages.hub import push_final
from warp_rlhf.stages.output import own_entry, owned
from warp_rlhf.stages.pipeline import evaluate_stage, prepare_output, reward_stage, train_stage
from warp_rlhf.stages.rewards import function_spec

RewardFunc = str | Callable | Any  # a spec as `reward_funcs` takes it, a function, or a classifier model
logger = logging.getLogger("warp_rlhf")


class WarpTrainer:
    """WARP (Ramé et al., 2024, Algorithm 1) with the arguments of TRL's `GRPOTrainer`.

    model: a hub name, a folder, or a `PreTrainedModel` (the SFT policy θ_sft).
    reward_funcs: one or a list of: a string as `reward_funcs` takes it ('trained', MODEL[LABEL],
        file.py:name), a function called as TRL calls one, or a sequence-classification
        `PreTrainedModel` (or `(model, LABEL)` to choose its output; a two-label classifier's
        reward is its second output); None: `args.reward_funcs`.
    args: a `WarpConfig` (every field of the command line's config); None: the defaults.
    train_dataset / eval_dataset: `datasets.Dataset` in TRL's prompt-only formats (standard or
        conversational), or a name or file as `dataset` takes it; eval_dataset None: held out
        from the training data.
    processing_class: the policy's tokenizer; None: loaded from the model's `name_or_path`.
    reward_processing_classes: one tokenizer per reward model object (None: from its name_or_path).
    peft_config: a `peft.LoraConfig`, mapped onto the `lora_*` fields.
    """

    def __init__(
        self,
        model: str | Any,
        reward_funcs: RewardFunc | Sequence[RewardFunc] | None = None,
        args: WarpConfig | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        reward_processing_classes: Any = None,
        peft_config: Any = None,
    ):
        self.args = args if args is not None else WarpConfig()
        self.model_init = model
        self.reward_funcs = _as_list(reward_funcs) if reward_funcs is not None else None
        self.train_dataset, self.eval_dataset = train_dataset, eval_dataset
        self.processing_class = processing_class
        self.reward_processing_classes = _as_list(reward_processing_classes) if reward_processing_classes else []
        self.peft_config = peft_config
        self.model = None  # θ_slerp^I once trained

    @property
    def output_dir(self) -> Path:
        return Path(self.args.output_dir)

    def train(self, resume_from_checkpoint: bool | str | None = None):
        """The reward stage where a reward is 'trained', then WARP; returns θ_slerp^I as a
        `PreTrainedModel`. `resume_from_checkpoint=True` continues an interrupted run (`--resume`).
        With `args.push_to_hub`, final/ is then pushed (`push_to_hub`)."""
        from transformers import AutoModelForCausalLM

        with owned(self.output_dir):
            config, functions = self._config()
            out = prepare_output(config, functions=functions)
            reward_stage(config, out)
            final = train_stage(config, out, resume=bool(resume_from_checkpoint), functions=functions)
        self.model = AutoModelForCausalLM.from_pretrained(final)
        if self.args.push_to_hub:
            self.push_to_hub()
        return self.model

    def evaluate(self) -> dict:
        """Reward, judge and KL to the SFT policy on the held-out prompts of every trained policy
        (SFT, WARP and its LITI front, the REINFORCE baseline when trained): eval/results.json's
        dict, each policy also at its top level (`results["warp"]`)."""
        with owned(self.output_dir):
            config, functions = self._config()
            out = prepare_output(config, functions=functions)
            results = evaluate_stage(config, out, functions=functions)
        if self.args.push_to_hub:
            push_final(self.args, self.output_dir, "Evaluation results")  # final/'s card now holds them
        return {**results, **results["policies"]}

    def push_to_hub(self, commit_message: str = "End of training") -> str:
        """Upload final/ (weights, tokenizer, model card) to `args.hub_model_id` (default: the
        output folder's name), as TRL's `Trainer.push_to_hub`; the repository's URL."""
        url = push_final(self.args, self.output_dir, commit_message)
        if url is None:
            raise ConfigError(f"{OutputDir(self.output_dir).final} holds no trained policy yet: call train() first")
        return url

    def save_model(self, output_dir: str | os.PathLike | None = None) -> Path:
        """Copy the trained policy (`final/`: weights, tokenizer, model card) to `output_dir`,
        loadable with `from_pretrained`; None: it stays in `args.output_dir/final`."""
        final = OutputDir(self.output_dir).final
        if not (final / "config.json").exists():
            raise ConfigError(f"{final} holds no trained policy yet: call train() first")
        if output_dir is None:
            return final
        shutil.copytree(final, output_dir, dirs_exist_ok=True)
        return Path(output_dir)

    # ---- objects → what a config names -----------------------------------------------------
    def _config(self) -> tuple[WarpConfig, dict[str, Callable]]:
        """`args` with every object saved (or named) as the stages take it, and the functions."""
        inputs, changes, functions = OutputDir(self.output_dir).inputs, {}, {}
        if not isinstance(self.model_init, str | os.PathLike):
            changes["policy"] = str(_save_model(self.model_init, self.processing_class, inputs, "policy"))
        elif str(self.model_init) != self.args.policy:
            changes["policy"] = str(self.model_init)
        if self.reward_funcs is not None:
            specs, tokenizers = [], iter(self.reward_processing_classes)
            for index, reward in enumerate(self.reward_funcs):
                if isinstance(reward, str | os.PathLike):
                    specs.append(str(reward))
                elif _is_model(reward) or (isinstance(reward, tuple) and _is_model(reward[0])):
                    model, output = reward if isinstance(reward, tuple) else (reward, _output_of(reward, index))
                    folder = _save_model(model, next(tokenizers, None), inputs, f"reward_{index + 1}")
                    specs.append(f"{folder}[{output}]" if output is not None else str(folder))
                elif callable(reward):
                    spec = function_spec(reward)
                    functions[spec] = reward
                    specs.append(spec)
                else:
                    raise ConfigError(f"reward_funcs[{index}] is a {type(reward).__name__}: give a function, a "
                                      "sequence-classification model, or a name as reward_funcs takes it")  # fmt: skip
            changes["reward_funcs"] = specs
        datasets = {"dataset": (self.train_dataset, "train"), "eval_dataset": (self.eval_dataset, "eval")}
        for field, (dataset, role) in datasets.items():
            if isinstance(dataset, str | os.PathLike):
                changes[field] = str(dataset)
            elif dataset is not None:
                changes[field] = str(_save_dataset(dataset, inputs, role))
        if self.peft_config is not None:
            changes |= _lora_fields(self.peft_config)
        return dataclasses.replace(self.args, **changes), functions


def _output_of(model: Any, index: int) -> str | None:
    """The output of a classifier object that is its reward: the only one; of two, the second (a
    binary classifier's positive class, said in a warning); of more, the caller must choose."""
    labels = [str(model.config.id2label.get(i, i)) for i in range(model.config.num_labels)]
    if len(labels) == 1:
        return None
    if len(labels) == 2:
        logger.warning(
            "reward_funcs[%d]: the classifier's reward is its logit of %r (output 1 of %s); "
            "give (model, LABEL) to choose another", index, labels[1], ", ".join(labels),
        )  # fmt: skip
        return "1"
    raise ModelError(
        f"reward_funcs[{index}] gives {len(labels)} scores per text ({', '.join(labels)}): give (model, LABEL) "
        "to choose the reward"
    )


def _as_list(value: Any) -> list:
    return list(value) if isinstance(value, list | tuple) else [value]


def _is_model(value: Any) -> bool:
    from transformers import PreTrainedModel

    return isinstance(value, PreTrainedModel)


def _fingerprint(update: Callable[[Any], None]) -> str:
    digest = hashlib.sha256()
    update(digest)
    return digest.hexdigest()[:12]


def _save_model(model: Any, tokenizer: Any, inputs: Path, role: str) -> Path:
    """`inputs/<role>-<fingerprint>/`: `model` and its tokenizer, saved once (safetensors); the
    fingerprint is of the weights, the model's config and the tokenizer's files."""
    import torch

    if not _is_model(model):
        raise ConfigError(f"{role} is a {type(model).__name__}: give a PreTrainedModel, a hub name or a folder")
    tokenizer = tokenizer if tokenizer is not None else _tokenizer_of(model, role)
    with tempfile.TemporaryDirectory() as files:
        tokenizer.save_pretrained(files)

        def update(digest) -> None:
            settings = {k: v for k, v in model.config.to_dict().items() if k not in _SAVED_CONFIG_KEYS}
            digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
            for name in sorted(os.listdir(files)):
                digest.update(name.encode() + Path(files, name).read_bytes())
            for name, tensor in sorted(model.state_dict().items()):
                data = tensor.detach().to("cpu").contiguous()
                digest.update(f"{name}:{data.dtype}:{tuple(data.shape)}".encode())
                digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")

        folder = inputs / f"{role}-{_fingerprint(update)}"
    if not (folder / "config.json").exists():
        own_entry(inputs.parent, inputs.name)
        with atomic_dir(folder) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
    return folder


_SAVED_CONFIG_KEYS = {"architectures", "transformers_version", "_name_or_path", "torch_dtype", "dtype"}
"""What `save_pretrained` writes into a model's config: not part of what the model is."""


def _tokenizer_of(model: Any, role: str):
    from transformers import AutoTokenizer

    name = getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", "")
    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as error:
        what = "processing_class" if role == "policy" else "reward_processing_classes"
        raise ModelError(
            f"the {role} model's tokenizer cannot be loaded from {name!r} ({type(error).__name__}): pass it as {what}"
        ) from None


def _save_dataset(dataset: Any, inputs: Path, role: str) -> Path:
    """`inputs/<role>-<fingerprint>.jsonl`: the rows of a `datasets.Dataset`, saved once."""
    if not hasattr(dataset, "to_json"):
        raise ConfigError(f"{role}_dataset is a {type(dataset).__name__}: give a datasets.Dataset, a name or a file")
    if len(dataset) == 0:
        raise ConfigError(f"{role}_dataset is empty")
    own_entry(inputs.parent, inputs.name)
    inputs.mkdir(exist_ok=True)
    tmp = inputs / f".{role}.jsonl.tmp-{os.getpid()}"
    try:
        dataset.to_json(str(tmp), lines=True, force_ascii=False)
        path = inputs / f"{role}-{_fingerprint(lambda digest: digest.update(tmp.read_bytes()))}.jsonl"
        if path.exists():
            tmp.unlink()
        else:
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _lora_fields(peft_config: Any) -> dict[str, Any]:
    """A `peft.LoraConfig` as the `lora_*` fields."""
    targets = peft_config.target_modules
    if targets is None or targets == "all-linear":
        targets = ["all-linear"]
    elif isinstance(targets, str):
        raise ConfigError(f"peft_config.target_modules={targets!r}: give a list of module names or 'all-linear'")
    return {
        "lora_r": int(peft_config.r),
        "lora_alpha": float(peft_config.lora_alpha),
        "lora_dropout": float(peft_config.lora_dropout),
        "lora_target_modules": sorted(targets),
    }
