"""Division of a tensor by a Python number, correctly rounded on every device.

On CUDA, PyTorch divides a tensor by a CPU scalar (a Python number or a 0-d CPU tensor) by
multiplying with the scalar's reciprocal, which can differ from the correctly rounded quotient by one
ulp; the CPU divides. Scales computed as ``amax / fmt.max`` then differ between devices in about half
of the rows (e.g. e4m3's 448), and so do the values quantized with them. Dividing by a 0-d tensor on
``x``'s own device takes the ordinary elementwise path, which divides correctly rounded everywhere.
"""
from __future__ import annotations

import torch

__all__ = ["div_scalar"]


def div_scalar(x: torch.Tensor, c: float) -> torch.Tensor:
    """``x / c``, correctly rounded in ``x``'s dtype on any device (same bits on CPU and CUDA)."""
    return x / torch.full((), c, dtype=x.dtype, device=x.device)
