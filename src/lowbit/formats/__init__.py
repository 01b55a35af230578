"""Number formats: which values exist. Rounding and scaling live elsewhere (see DESIGN.md)."""
from .base import ElementFormat, FormatError
from .block import BlockFormat, block
from .codebook import Codebook, codebook
from .integer import IntFormat
from .minifloat import FloatFormat
from .registry import Format, format, known_names

__all__ = ["ElementFormat", "FormatError", "BlockFormat", "block", "Codebook", "codebook",
           "IntFormat", "FloatFormat", "Format", "format", "known_names"]
