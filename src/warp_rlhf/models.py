"""Loading models and tokenizers by hub name or local folder, with clear errors."""

from __future__ import annotations

from pathlib import Path

import torch

from warp_rlhf.errors import ModelError


def _looks_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or Path(name).exists()


def _check_exists(name: str, what: str) -> None:
    path = Path(name).expanduser()
    if _looks_local(name) and not path.exists():
        raise ModelError(f"{what} {name} does not exist")
    if path.is_dir() and not (path / "config.json").exists():
        raise ModelError(f"{what} {name} is not a model folder (no config.json)")


def load_tokenizer(name: str, *, padding_side: str = "right", trust_remote_code: bool = False):
    """A tokenizer with a pad token (the EOS token when it has none)."""
    from transformers import AutoTokenizer

    _check_exists(name, "tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    tokenizer.padding_side = padding_side
    return tokenizer


def load_causal_lm(name: str, *, trust_remote_code: bool = False, dtype: torch.dtype = torch.float32):
    """A causal LM in training-ready fp32 (or `dtype`)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    _check_exists(name, "policy")
    config = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not trust_remote_code:
        raise ModelError(f"policy {name} is a '{config.model_type}' model, not a causal language model")
    return AutoModelForCausalLM.from_pretrained(name, trust_remote_code=trust_remote_code, dtype=dtype)
