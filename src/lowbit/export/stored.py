"""A lowbit checkpoint as the exporters read it: the checked manifest, every stored tensor, and per
quantized layer its spec with the integer levels and scales the codes hold (what another format's
blocks are built from), without building the model."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

from ..formats import BlockFormat
from ..quant.packed import unpack_bits
from ..quant.spec import QuantSpec
from ..quant.weight import WeightQuantizer
from .packing import unpack_weight
from .validate import CheckpointError, matrix_shape, read_manifest, read_tensors


@dataclass
class StoredLayer:
    """One quantized layer: ``levels`` are the grid values (integers for int formats, before the
    scale), ``scales`` and ``zeros`` (None when symmetric) are (rows, groups) as stored."""
    name: str
    spec: QuantSpec
    shape: Tuple[int, int]
    tensors: Dict[str, torch.Tensor]
    retain: Optional[str]

    def weight(self) -> torch.Tensor:
        """The float32 weight lowbit's model uses (``export.packing.unpack_weight``)."""
        return unpack_weight(self.tensors, self.spec, self.shape, retain=self.retain)

    def levels(self) -> torch.Tensor:
        """(rows, cols) float64 grid values of the codes."""
        q = WeightQuantizer(self.spec)
        elem = q.fmt.element if isinstance(q.fmt, BlockFormat) else q.grid
        rows, cols = self.shape
        return elem.decode_codes(unpack_bits(self.tensors["codes"], elem.bits, rows * cols)).reshape(rows, cols)

    def zeros(self) -> Optional[torch.Tensor]:
        """(rows, groups) integer zero points as float32, or None (symmetric specs)."""
        if "zeros" not in self.tensors:
            return None
        q = WeightQuantizer(self.spec)
        rows, cols = self.shape
        n = len(q.groups(cols))
        return unpack_bits(self.tensors["zeros"], q.grid.bits, rows * n).reshape(rows, n).float()


@dataclass
class StoredCheckpoint:
    path: Path
    meta: dict
    layers: Dict[str, StoredLayer]
    floats: Dict[str, torch.Tensor]  # every other tensor by its model name, tied names included


def read_checkpoint(path) -> StoredCheckpoint:
    """The checkpoint at ``path`` (checked as ``lowbit.load`` checks it)."""
    d = Path(path)
    meta = read_manifest(d)
    state = read_tensors(d, meta)
    layers = {}
    for name, info in meta["layers"].items():
        prefix = f"{name}.weight."
        tensors = {k[len(prefix):]: state.pop(k) for k in list(state) if k.startswith(prefix)}
        layers[name] = StoredLayer(name, QuantSpec.parse(info["weight"]), matrix_shape(info["shape"]), tensors,
                                   info.get("retain"))
    for name, source in meta["tied"].items():
        if source not in state:
            raise CheckpointError(f"{d / 'lowbit.json'}: tied[{name!r}]: expected a stored tensor {source!r}, "
                                  "found none")
        state[name] = state[source]
    return StoredCheckpoint(d, meta, layers, state)
