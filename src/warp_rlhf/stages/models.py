"""Loading models and tokenizers by hub name or local folder, with one-line errors.

`trust_remote_code` is passed through and is off unless the config turns it on.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch

from warp_rlhf.errors import ModelError


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
        reason = next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)
        raise ModelError(f"{what} {name} cannot be loaded: {reason.strip()}") from None


def load_tokenizer(name: str, *, padding_side: str = "right", trust_remote_code: bool = False):
    """A tokenizer with a pad token (the EOS token, else UNK, when it has none)."""
    from transformers import AutoTokenizer

    _check_exists(name, "tokenizer", ("tokenizer_config.json", "tokenizer.json", "config.json"))
    with loading(name, "tokenizer"):
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    tokenizer.padding_side = padding_side
    return tokenizer


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
    with loading(name, "policy"):
        return AutoModelForCausalLM.from_pretrained(name, trust_remote_code=trust_remote_code, dtype=dtype)
