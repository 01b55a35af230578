"""A low-precision training recipe: the format of each operand of a linear layer's three matmuls,
and where HALO's Hadamard rotations go.

A linear layer ``Y = X W^T`` trains with three matmuls, each reducing over one inner dimension:

    forward          Y   = X   W^T   inner: the input features K   operands X (T,K),   W (N,K)
    input gradient   E_X = E_Y W     inner: the output features N  operands E_Y (T,N), W^T (K,N)
    weight gradient  E_W = E_Y^T X   inner: the tokens T           operands E_Y^T (N,T), X^T (K,T)

``x``, ``w`` and ``g`` are the QuantSpecs of X, W and E_Y wherever they appear. Scales always run
along the inner dimension of the matmul the operand feeds: ``tensor`` is one scale, ``channel`` (or
``token``) one per row of the operand, ``gN`` groups of N inner elements, a block format (mxfp4,
nvfp4 ...) its own blocks. HALO levels (arXiv 2501.02625): 0 no rotation; 1 a block Hadamard
rotation of the inner dimension of the forward and input-gradient matmuls (hidden features); 2 also
of the weight gradient's inner dimension (tokens). A rotation ``R`` is orthogonal, so
``(A R)(B R)^T = A B^T``: only the rounding of the operands changes.

Text form: ``PRESET[:LEVEL]`` or ``SPEC[:LEVEL]`` (one lowbit quant spec for all three operands),
e.g. ``fp8:2``, ``int8:0``, ``e3m2:1``, ``mxfp4:1``, ``e2m1fn:g32:2``; ``bf16`` trains unquantized.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Optional

from ..formats import BlockFormat
from ..quant.spec import QuantSpec
from ..rounding import check_rounding

LEVELS = (0, 1, 2)
BACKENDS = ("auto", "emulate", "kernel")

# name -> (x, w, g): the operand specs of each preset
PRESETS = {
    "fp8": ("e4m3fn:tensor", "e4m3fn:tensor", "e5m2:tensor"),        # E4M3 forward, E5M2 gradients
    "fp8e4": ("e4m3fn:tensor", "e4m3fn:tensor", "e4m3fn:tensor"),    # E4M3 throughout
    "fp8row": ("e4m3fn:channel", "e4m3fn:channel", "e4m3fn:channel"),
    "int8": ("int8:channel", "int8:channel", "int8:channel"),
    "int8t": ("int8:tensor", "int8:tensor", "int8:tensor"),
    "e3m2": ("e3m2fn:channel", "e3m2fn:channel", "e3m2fn:channel"),  # FP6 E3M2 (OCP: no inf/nan)
    "fp6": ("e3m2fn:channel", "e3m2fn:channel", "e3m2fn:channel"),
    "mxfp8": ("mxfp8_e4m3", "mxfp8_e4m3", "mxfp8_e5m2"),
    "mxfp6": ("mxfp6_e3m2", "mxfp6_e3m2", "mxfp6_e3m2"),
    "mxfp4": ("mxfp4", "mxfp4", "mxfp4:stochastic"),                 # stochastic gradients, as QuEST/Quartet
    "nvfp4": ("nvfp4", "nvfp4", "nvfp4:stochastic"),
}
UNQUANTIZED = ("bf16", "none", "fp32")


def check_operand_spec(spec, role: str) -> QuantSpec:
    """``spec`` as a QuantSpec a matmul operand can take (symmetric, absmax scales); else a
    ValueError naming what is accepted."""
    try:
        s = QuantSpec.parse(spec)
    except ValueError as e:
        raise ValueError(f"operand {role}: {e}") from None
    if not s.symmetric:
        raise ValueError(f"operand {role}: {s} is asymmetric; matmul operands take symmetric formats only")
    if s.scale_method != "absmax":
        raise ValueError(f"operand {role}: {s} asks for {s.scale_method} scales; operands of a training matmul "
                         "are scaled by their absmax (one pass, no search)")
    if s.granularity == "head":
        raise ValueError(f"operand {role}: granularity 'head' applies to KV states only; accepted: tensor, "
                         "channel/token (one scale per row), gN, or a block format")
    return s


@dataclass(frozen=True)
class LowpRecipe:
    """The formats of X, W and E_Y (see the module docstring), the HALO level, the Hadamard block
    size and the backend: ``auto``: real FP8/INT8 kernels on CUDA where the operands allow, emulation
    elsewhere (E4M3/E5M2/INT8 nearest-even operands rounded by torch's cast, bit for bit lowbit's);
    ``emulate``: every operand through lowbit's quantizers, float32 matmuls; ``kernel``: the real
    kernels on any device that has them, refusing to emulate."""

    x: str
    w: str
    g: str
    level: int = 0
    block: int = 256
    backend: str = "auto"
    name: Optional[str] = None

    def __post_init__(self) -> None:
        for role in ("x", "w", "g"):
            object.__setattr__(self, role, str(check_operand_spec(getattr(self, role), role)))
        if self.level not in LEVELS:
            raise ValueError(f"HALO level must be 0, 1 or 2, got {self.level!r}")
        if isinstance(self.block, bool) or not isinstance(self.block, int) or self.block < 2 \
                or self.block & (self.block - 1):
            raise ValueError(f"Hadamard block must be a power of two >= 2, got {self.block!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")

    def spec(self, role: str) -> QuantSpec:
        return QuantSpec.parse(getattr(self, role))

    def with_grad_rounding(self, rounding: str) -> "LowpRecipe":
        """The same recipe with E_Y rounded by ``rounding`` (e.g. stochastic)."""
        g = replace(self.spec("g"), rounding=check_rounding(rounding))
        return replace(self, g=str(g))

    def inner_multiple(self, roles) -> int:
        """The size an inner dimension reduced over operands ``roles`` must be a multiple of: the
        least common multiple of their group / block sizes (1 for per-tensor and per-row scales)."""
        m = 1
        for role in roles:
            s = self.spec(role)
            if s.granularity in ("group", "block"):
                m = math.lcm(m, s.group_size)
        return m

    def check_layer(self, in_features: int, out_features: int) -> None:
        """ValueError when a linear layer of this shape cannot take the recipe's groups or blocks."""
        for dim, n, roles in (("in_features", in_features, ("x", "w")), ("out_features", out_features, ("g", "w"))):
            m = self.inner_multiple(roles)
            if n % m:
                raise ValueError(f"{self.describe()}: {dim}={n} is not a multiple of {m}, the group/block size of "
                                 f"the operands reduced over it; choose per-tensor/per-row scales or smaller groups")

    def describe(self) -> str:
        head = self.name or f"x={self.x} w={self.w} g={self.g}"
        return f"{head} HALO-{self.level} (block {self.block})"

    def to_dict(self) -> dict:
        return asdict(self)

    def is_block(self, role: str) -> bool:
        return isinstance(self.spec(role).fmt, BlockFormat)


def parse_recipe(text, *, block: int = 256, backend: str = "auto", grad_rounding: Optional[str] = None
                 ) -> Optional[LowpRecipe]:
    """``PRESET[:LEVEL]`` or ``SPEC[:LEVEL]`` as a LowpRecipe; None for ``bf16`` (unquantized)."""
    if isinstance(text, LowpRecipe):
        return text
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"a low-precision recipe is text like 'fp8:2' or 'int8:0', got {text!r}")
    body, level = text.strip(), 0
    head, _, last = body.rpartition(":")
    if head and last.isdigit():
        body, level = head, int(last)
        if level not in LEVELS:
            raise ValueError(f"recipe {text!r}: HALO level must be 0, 1 or 2, got {level}")
    if body.lower() in UNQUANTIZED:
        return None
    if body.lower() in PRESETS:
        x, w, g = PRESETS[body.lower()]
        name = body.lower()
    else:
        try:
            QuantSpec.parse(body)
        except ValueError as e:
            raise ValueError(f"recipe {text!r}: {body!r} is neither a preset ({', '.join(PRESETS)}, bf16) nor a "
                             f"quant spec ({e})") from None
        x = w = g = body
        name = body
    r = LowpRecipe(x, w, g, level=level, block=block, backend=backend, name=name)
    return r.with_grad_rounding(grad_rounding) if grad_rounding else r
