"""Emulated low-precision arithmetic for numerical analysis, in the spirit of Higham's chop and Pychop.

basic        correctly rounded add/sub/mul/div/sqrt/fma, matmul/dot/sum with a chosen accumulator, Chop
elementary   exp, log, sin, ..., power, floor, mod, floor_divide, correctly rounded to a format
reductions   cumsum, cumprod, prod, mean, var, std: sequential, blocked or pairwise, rounded per step
faults       bit flips in the encoded codes of any format (soft errors), and model hooks
chop         MATLAB chop / Pychop options (prec, rmode, subnormal, explim, flip, p) on lowbit formats
chunked      the same functions over arrays larger than memory, block by block
"""
from .basic import Chop, add, div, dot, fma, matmul, mul, resolve_overflow, sqrt, sub, sum  # noqa: A004
from .chop import ChopOptions, chop
from .fault_hooks import activation_faults, weight_faults
from .faults import field_mask, flip_bits, inject_encoded, inject_faults
from .reductions import cumprod, cumsum, mean, prod, std, var
from .elementary import (arccos, arccosh, arcsin, arcsinh, arctan, arctanh, ceil, cos, cosh, exp,  # noqa: A004
                         expm1, floor, floor_divide, log, log1p, log2, log10, mod, power, round, sign, sin,
                         sinh, tan, tanh)

__all__ = ["add", "sub", "mul", "div", "sqrt", "fma", "matmul", "dot", "sum", "Chop", "resolve_overflow",
           "exp", "expm1", "log", "log1p", "log2", "log10", "power", "sin", "cos", "tan", "arcsin",
           "arccos", "arctan", "sinh", "cosh", "tanh", "arcsinh", "arccosh", "arctanh", "floor", "ceil",
           "round", "sign", "mod", "floor_divide", "cumsum", "cumprod", "prod", "mean", "var", "std", "chop", "ChopOptions",
           "field_mask", "flip_bits", "inject_encoded", "inject_faults", "weight_faults", "activation_faults"]
