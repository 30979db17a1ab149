"""warp-rlhf: WARP (Weight Averaged Rewarded Policies, Ramé et al., 2024) for causal LMs."""

from warp_rlhf.config import WarpConfig, load_config
from warp_rlhf.errors import WarpError

__all__ = ["WarpConfig", "WarpError", "load_config"]
__version__ = "0.1.0"
