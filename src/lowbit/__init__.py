"""lowbit: low-precision number formats, emulated bit-exactly, and the tools to put models in them."""
from .emulate import Encoded, decode, encode, quantize
from .formats import (BlockFormat, Codebook, ElementFormat, FloatFormat, Format, FormatError, IntFormat,
                      block, codebook, format)
from .rounding import OVERFLOW_POLICIES, ROUNDING_MODES
from . import arith  # noqa: E402  (emulated arithmetic; lowbit.jax stays lazy: import lowbit.jax)
from .arith.chop import chop  # noqa: E402  (MATLAB chop / Pychop front door)
# model verbs (docs/api.md); ``evaluate`` the function stands where the subpackage's name was, which
# stays importable as ``from lowbit.evaluate import perplexity``
from .api import Checkpoint, convert, evaluate, load, prepare_qat, quantize_model, save

__version__ = "0.1.0"

__all__ = ["quantize", "chop", "encode", "decode", "Encoded", "format", "block", "codebook", "Format",
           "ElementFormat", "FloatFormat", "IntFormat", "Codebook", "BlockFormat", "FormatError",
           "ROUNDING_MODES", "OVERFLOW_POLICIES",
           "quantize_model", "save", "load", "evaluate", "Checkpoint", "prepare_qat", "convert"]
