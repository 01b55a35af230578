"""Low-precision training (HALO): linear layers whose forward, input-gradient and weight-gradient
matmuls run in a chosen low-precision format, with Hadamard rotations by HALO level; real FP8/INT8
kernels where the hardware has them, bit-faithful emulation for any lowbit format elsewhere."""
from .fsdp import shard_model
from .linear import LowpLinear, LowpMatmuls, lowp_linear
from .recipe import PRESETS, LowpRecipe, parse_recipe
from .surgery import prepare_lowp, set_lowp

__all__ = ["LowpLinear", "LowpMatmuls", "lowp_linear", "LowpRecipe", "parse_recipe", "PRESETS", "prepare_lowp", "set_lowp",
           "shard_model"]
