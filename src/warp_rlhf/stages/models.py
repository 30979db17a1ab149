"""Loading models and tokenizers by hub name or local folder, with one-line errors.

`trust_remote_code` is passed through and is off unless the config turns it on. Weights are read
from safetensors files only (`use_safetensors=True`): a `pytorch_model.bin` is a pickle, which can
run code when loaded. A tokenizer must read text: one loaded from a folder without its files reads
every text as unknown tokens, and a reward model behind it would give every text the same score.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch

from warp_rlhf.errors import ModelError

SAFETENSORS = ("model.safetensors", "model.safetensors.index.json")
SAMPLE_TEXT = "The movie was good, and the story is a great one."
"""A text any tokenizer of a language model reads as at least one known word or piece."""


def _check_exists(name: str, what: str, markers: tuple[str, ...] = ("config.json",)) -> None:
    """A local path must exist and hold one of `markers`; hub names are left to the hub."""
    path = Path(name).expanduser()
    if name.startswith((".", "/", "~")) and not path.exists():
        raise ModelError(f"{what} {name} does not exist")
    if path.is_file() or (path.is_dir() and not any((path / marker).exists() for marker in markers)):
        raise ModelError(f"{what} {name} is not a model folder (no {markers[0]})")


@contextlib.contextmanager
def loading(name: str, what: str) -> Iterator[None]:
    """Turn the many ways `from_pretrained` fails (hub, files, formats) into one ModelError."""
    try:
        yield
    except ModelError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        if isinstance(error, OSError) and "cannot be loaded with `safetensors`" in str(error):
            raise no_safetensors(name, what, "on the hub") from None
        reason = next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)
        raise ModelError(f"{what} {name} cannot be loaded: {reason.strip()}") from None


def no_safetensors(name: str, what: str, where: str) -> ModelError:
    """The one-line refusal of weights that are not safetensors, with the way to convert them."""
    return ModelError(
        f"{what} {name} has no safetensors weights ({SAFETENSORS[0]}) {where}, and warp-rlhf never loads pickled "
        "weights: load the model where you trust the file and save it with model.save_pretrained(folder), "
        "which writes safetensors"
    )


def check_safetensors(name: str, what: str) -> None:
    """A local model folder must hold safetensors weights (hub names are refused when loaded)."""
    path = Path(name).expanduser()
    if not path.is_dir() or any((path / file).is_file() for file in SAFETENSORS):
        return
    pickled = sorted(p.name for p in path.iterdir() if p.suffix in {".bin", ".pt", ".pth", ".ckpt"})
    raise no_safetensors(name, what, f"in its folder (only {', '.join(pickled)})" if pickled else "in its folder")


def check_loadable(name: str, what: str, *, trust_remote_code: bool = False) -> None:
    """Fail in one line before any work on a model whose weights are not safetensors or whose
    tokenizer cannot be loaded or reads no text."""
    check_safetensors(name, what)
    load_tokenizer(name, trust_remote_code=trust_remote_code)


def load_tokenizer(name: str, *, padding_side: str = "right", trust_remote_code: bool = False):
    """A tokenizer that reads text (`check_reads_text`) with a pad token (the EOS token, else UNK,
    when it has none)."""
    from transformers import AutoTokenizer

    _check_exists(name, "tokenizer", ("tokenizer_config.json", "tokenizer.json", "config.json"))
    with loading(name, "tokenizer"):
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
        check_reads_text(tokenizer, name)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    tokenizer.padding_side = padding_side
    return tokenizer


def check_reads_text(tokenizer, name: str) -> None:
    """Refuse a tokenizer that knows no word of `SAMPLE_TEXT`: every token unknown, or none that
    decodes to a letter or digit. `AutoTokenizer` builds such an empty tokenizer, without a word,
    from a model folder that lacks the tokenizer's files."""
    ids = tokenizer(SAMPLE_TEXT, add_special_tokens=False)["input_ids"]
    known = [i for i in ids if i != tokenizer.unk_token_id]
    if not any(c.isalnum() for i in known for c in tokenizer.decode([i], skip_special_tokens=True)):
        raise ModelError(
            f"tokenizer {name} knows no word of {SAMPLE_TEXT!r}: its vocabulary is missing (a folder without the "
            "tokenizer's files); save the model's tokenizer there with tokenizer.save_pretrained(folder)"
        )


def model_config(name: str, what: str, *, trust_remote_code: bool = False):
    from transformers import AutoConfig

    _check_exists(name, what)
    with loading(name, what):
        return AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)


def context_window(config) -> int | None:
    """The longest sequence the model takes, when its config says."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None


def load_causal_lm(name: str, *, trust_remote_code: bool = False, dtype: torch.dtype = torch.float32):
    """A causal language model in fp32 (or `dtype`); see `pipeline.check_models` for the role checks."""
    from transformers import AutoModelForCausalLM

    _check_exists(name, "policy")
    check_safetensors(name, "policy")
    with loading(name, "policy"):
        return AutoModelForCausalLM.from_pretrained(
            name, trust_remote_code=trust_remote_code, dtype=dtype, use_safetensors=True
        )
