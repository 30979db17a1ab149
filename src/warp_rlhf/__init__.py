"""warp-rlhf: WARP (Weight Averaged Rewarded Policies, Ramé et al., 2024) for causal LMs."""

from warp_rlhf.config import WarpConfig, load_config
from warp_rlhf.errors import WarpError

__all__ = ["WarpConfig", "WarpError", "WarpTrainer", "load_config"]
__version__ = "0.1.0"


def __getattr__(name: str):
    """`WarpTrainer` on first use: importing the package stays light (no transformers)."""
    if name == "WarpTrainer":
        from warp_rlhf.trainer import WarpTrainer

        return WarpTrainer
    raise AttributeError(f"module 'warp_rlhf' has no attribute {name!r}")
