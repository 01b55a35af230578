"""Block-by-block post-training quantization of a model.

One block at a time: run it on its captured inputs while hooks accumulate each linear layer's input
Hessian, quantize its linears (RTN or GPTQ), then run the quantized block to produce the next
block's inputs. Memory holds one block's activations; finished blocks are saved to a progress
folder so an interrupted run resumes from the last finished block.
"""
from __future__ import annotations

import json
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

from ..models.kv_cache import apply_kv_plan
from ..models.blocks import (BlockInput, capture_block_inputs, find_blocks, linear_layers, merge_block_inputs,
                             replace_module, run_block)
from ..models.loader import UnsupportedArchitectureError
from ..quant.linear import QuantLinear
from ..quant.plan import Plan
from ..quant.spec import QuantSpec
from ..quant.weight import WeightQuantizer
from ..quant.packed import pack_weight
from .retention import unpack_weight
from ..heap import reuse_freed_memory
from .gptq import HessianAccumulator, gptq_shared
from .sequential import run_sequential

METHODS = ("rtn", "gptq")
CALIBRATIONS = ("auto", "sequential", "parallel")


@dataclass
class LayerResult:
    name: str
    weight_spec: Optional[str]
    act_spec: Optional[str]
    shape: tuple
    groups: str
    bits_per_weight: float
    rel_error: float          # GPTQ: ||X (W - Q)^T||^2 / ||X W^T||^2 on the calibration inputs;
                              # RTN (no data): ||W - Q||^2 / ||W||^2
    seconds: float
    note: str = ""
    retain: Optional[dict] = None  # high-impact retention: format, ratio, kept count, side bits


@dataclass
class QuantizationResult:
    method: str
    plan: dict
    layers: List[LayerResult] = field(default_factory=list)
    skipped: Dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    packed: Dict[str, Dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)
    kv: Dict[str, dict] = field(default_factory=dict)  # attention module -> {"key", "value"} specs
    calibration: str = "none"  # how Hessians were gathered: sequential | parallel | none (RTN)

    def bits_per_weight(self) -> float:
        """Weighted over the quantized layers."""
        n = sum(l.shape[0] * l.shape[1] for l in self.layers if l.weight_spec)
        b = sum(l.bits_per_weight * l.shape[0] * l.shape[1] for l in self.layers if l.weight_spec)
        return b / n if n else 16.0

    def to_dict(self) -> dict:
        d = {"method": self.method, "plan": self.plan, "calibration": self.calibration, "seconds": self.seconds,
             "layers": [asdict(l) for l in self.layers], "skipped": self.skipped}
        if self.kv:
            d["kv"] = self.kv
        return d


def block_hessians(block, inputs, hidden, layers: Dict[str, nn.Linear]) -> Dict[str, HessianAccumulator]:
    """Run the block on every batch, accumulating each layer's input Hessian. Layers fed the very
    same input tensor (q/k/v, gate/up) share one accumulator: X^T X is computed once."""
    hess: Dict[str, HessianAccumulator] = {}
    last = {"x": None, "name": None}

    def hook(name, x):
        if x is last["x"]:
            hess[name] = hess[last["name"]]
            return
        last["x"], last["name"] = x, name
        if name not in hess:
            hess[name] = HessianAccumulator(x.shape[-1], x.device)
        hess[name].add(x)

    hooks = [lin.register_forward_hook(lambda m, a, o, n=n: hook(n, a[0])) for n, lin in layers.items()]
    try:
        for inp, h in zip(inputs, hidden):
            run_block(block, inp, h)
            last["x"] = None
    finally:
        for h in hooks:
            h.remove()
    return hess


def input_hessian(lin: nn.Module, H: torch.Tensor) -> torch.Tensor:
    """The Hessian of what the stored weight multiplies: a layer with an online input transform
    (rotation/smoothing, lowbit.transforms) stores W T and sees x T, so GPTQ needs T^T H T."""
    tf = getattr(lin, "input_transform", None)
    return H if tf is None else tf.transform_hessian(H)


def _relative_error(W: torch.Tensor, Q: torch.Tensor, H: Optional[torch.Tensor]) -> float:
    """Output-space error ||X(W-Q)^T||^2 / ||XW^T||^2 through H = 2X^T X/n; weight-space without H."""
    D = (W.float() - Q.float())
    if H is None:
        return float(D.pow(2).sum() / W.float().pow(2).sum())
    num = torch.einsum("ij,jk,ik->", D, H, D)
    den = torch.einsum("ij,jk,ik->", W.float(), H, W.float())
    return float(num / den) if den > 0 else float("nan")


def _has_blocks(model: nn.Module) -> bool:
    try:
        find_blocks(model)
        return True
    except UnsupportedArchitectureError:
        return False


def quantize_model(
    model: nn.Module,
    plan: Plan,
    batches: List[dict],
    method: str = "gptq",
    *,
    block_size: int = 128,
    percdamp: float = 0.01,
    act_order: bool = True,
    progress_dir: Optional[Path] = None,
    on_layer: Optional[Callable[[LayerResult], None]] = None,
    progress: bool = True,
    retain=None,
    calibration: str = "auto",
    device=None,
) -> QuantizationResult:
    """Quantize every linear layer the plan names, in place; returns per-layer results.

    Models with transformer blocks go block by block; models with convolutions or without blocks
    (CNNs, MLPs) go layer by layer (``lowbit.ptq.layerwise``, resuming after the last finished layer).

    ``calibration`` (GPTQ and retention): "sequential" runs each block once over all calibration
    tokens, quantizing each layer when the forward reaches it, so its Hessian comes from the
    outputs of the already quantized layers before it; "parallel" takes all of a block's Hessians
    from its unquantized forward, batch by batch, then runs the quantized block again (two passes,
    one batch in memory at a time); "auto" is sequential when the merged batch fits in memory.

    ``device`` (offload): calibrate and quantize each block on this device while the model stays
    where it is (e.g. in CPU memory), moving one block at a time there and back, so a model larger
    than the accelerator's memory streams through it. None: everything runs where the model is."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; accepted: {', '.join(METHODS)}")
    if calibration not in CALIBRATIONS:
        raise ValueError(f"unknown calibration {calibration!r}; accepted: {', '.join(CALIBRATIONS)}")
    from .layerwise import has_conv, quantize_layerwise  # models without transformer blocks

    if has_conv(model) or not _has_blocks(model):
        return quantize_layerwise(model, plan, batches, method, block_size=block_size, percdamp=percdamp,
                                  act_order=act_order, progress_dir=progress_dir, on_layer=on_layer,
                                  progress=progress)
    t0 = time.time()
    blocks_path, blocks = find_blocks(model)
    result = QuantizationResult(method, plan.to_dict())
    if retain is not None:  # a different retention must not resume from this progress
        result.plan = {**result.plan, "retain": {k: v for k, v in retain.to_dict().items() if k != "allocation"}}
    # KV quantization first, so that calibration sees the attention the quantized model will run
    result.kv, kv_skipped = apply_kv_plan(model, plan)
    result.skipped.update({f"{n} (kv)": why for n, why in kv_skipped.items()})
    done = _load_progress(progress_dir, model, result) if progress_dir else -1

    # RTN needs no data: only GPTQ (or retention's saliency) runs the blocks
    calibrated = method == "gptq" or retain is not None
    scores = (_prepare_retention(model, plan, batches, retain, progress,
                                 dict(block_size=block_size, percdamp=percdamp, act_order=act_order))
              if retain is not None else None)
    inputs = capture_block_inputs(model, blocks[0], batches) if calibrated else []
    home = next(model.parameters()).device
    work = torch.device(device) if device is not None else home
    if work != home:
        inputs = [_to_device(inp, work) for inp in inputs]
    hidden = [inp.hidden for inp in inputs]
    if done >= 0 and calibrated:
        hidden = [h.to(work) for h in _load_hidden(progress_dir, len(hidden))]

    merged = None
    if calibrated and calibration != "parallel":
        merged = merge_block_inputs(inputs, hidden)
        if merged is None and calibration == "sequential":
            raise ValueError("sequential calibration runs each block once over all calibration batches "
                             "together, but these batches cannot be concatenated (different shapes or "
                             "per-batch arguments); use calibration='parallel' or 'auto'")
        if merged is not None and calibration == "auto" and not _one_pass_fits(merged.hidden, blocks[0]):
            merged = None
    result.calibration = "sequential" if merged is not None else ("parallel" if calibrated else "none")
    blockq = _BlockQuantizer(model, plan, method, result, retain, scores, on_layer,
                             dict(block_size=block_size, percdamp=percdamp, act_order=act_order))

    groups = None  # which layers of a block read the same tensor, as seen in the previous block
    bar = progress_bar(len(blocks), progress, initial=done + 1)
    with torch.inference_mode(), reuse_freed_memory():
        for bi in range(done + 1, len(blocks)):
            block = blocks[bi]
            if work != home:
                block.to(work)
            prefix = f"{blocks_path}.{bi}"
            layers = linear_layers(block, prefix)
            todo = {}
            for name, lin in layers.items():
                wspec = plan.weight_spec(name)
                if wspec is None:
                    continue
                why = WeightQuantizer(wspec).check(tuple(lin.weight.shape))
                if why:
                    warnings.warn(f"{name} left in full precision: {why}", stacklevel=2)
                    result.skipped[name] = why
                    continue
                todo[name] = (lin, wspec)
            # activation-only layers (weight kept) still get their input quantizer
            for name, lin in layers.items():
                if name not in todo and plan.act_spec(name) is not None and plan.weight_spec(name) is None:
                    replace_module(model, name, QuantLinear.from_linear(lin, lin.weight, None, plan.act_spec(name)))
            if merged is not None:
                # one pass: each layer is quantized when the block's forward first reaches it, from the
                # inputs the already quantized layers before it produce
                merged.hidden = torch.cat(hidden)
                out, groups = run_sequential(block, merged, todo, blockq.quantize_group, prefix, groups)
                hidden = list(out.split([h.shape[0] for h in hidden]))
            else:
                hess = block_hessians(block, inputs, hidden, {n: lin for n, (lin, _) in todo.items()}) \
                    if calibrated else {}
                blockq.quantize_block(todo, hess)
                hidden = [run_block(block, inp, h) for inp, h in zip(inputs, hidden)] if calibrated else []
            if work != home:
                block.to(home)
            if not all(torch.isfinite(h).all() for h in hidden):
                raise FloatingPointError(f"block {prefix} produced nan/inf after quantization")
            if progress_dir:
                _save_progress(progress_dir, bi, hidden, result, todo)
            bar.update(1)
    bar.close()
    result.seconds = time.time() - t0
    return result


class _BlockQuantizer:
    """Quantizes layers given their input Hessians and installs them in the model, recording each
    layer's result: shared by the two calibration orders."""

    def __init__(self, model, plan, method, result, retain, scores, on_layer, gptq_kw):
        self.model, self.plan, self.method, self.result = model, plan, method, result
        self.retain, self.scores, self.on_layer, self.gptq_kw = retain, scores, on_layer, gptq_kw
        self.done = set()

    def quantize_block(self, todo, hess) -> None:
        """Every layer of ``todo`` (name -> (linear, spec)) with Hessians from ``hess`` (name ->
        HessianAccumulator; empty for RTN); GPTQ of layers sharing a Hessian runs as one matrix."""
        groups: Dict[int, list] = {}  # layers fed the same input share one accumulator
        for name, (lin, wspec) in todo.items():
            groups.setdefault(id(hess.get(name)), []).append((name, lin, wspec))
        for items in groups.values():
            first = items[0][0]
            self.quantize_group(items, hess[first].H if first in hess else None)

    def quantize_group(self, items, H: Optional[torch.Tensor]) -> Dict[str, nn.Module]:
        """Layers ``[(name, linear, spec)]`` reading one input with Hessian ``H`` (None: no data,
        RTN); GPTQ of those with the same spec and input transform runs as one stacked matrix.
        Returns the installed quantized modules by name."""
        parts: Dict[tuple, list] = {}
        for name, lin, spec in items:
            tf = getattr(lin, "input_transform", None)
            parts.setdefault((str(spec), None if tf is None else tf.signature()), []).append((name, lin, spec))
        for part in parts.values():
            if self.method == "gptq" and self.retain is None and H is not None:
                ts = time.time()
                qs = [WeightQuantizer(spec) for _, _, spec in part]
                res = gptq_shared([lin.weight.detach().float() for _, lin, _ in part], input_hessian(part[0][1], H),
                                  qs, **self.gptq_kw)
                took = (time.time() - ts) / len(part)
                for (name, lin, spec), r, q in zip(part, res, qs):
                    self._finish(name, lin, spec, H, (r, q, took))
            else:
                note = "never called by the calibration forward: RTN" if H is None and self.method == "gptq" else ""
                for name, lin, spec in part:
                    self._finish(name, lin, spec, H, None, note)
        return {name: self.model.get_submodule(name) for name, _, _ in items}

    def _finish(self, name, lin, wspec, H_raw, gptq_res, note: str = "") -> None:
        ts = time.time()
        q = WeightQuantizer(wspec)
        W = lin.weight.detach().float()
        H = input_hessian(lin, H_raw) if H_raw is not None else None
        if self.retain is not None:
            from .retention import retain_layer

            Q, params, packed, extra_bits, rinfo = retain_layer(
                name, W, H, q, self.retain, self.method, self.scores, self.gptq_kw)
        elif gptq_res is not None:
            res, q, took = gptq_res
            ts -= took
            Q, params = res.weight, res.params
            note = f"damping {res.damping:g}" if res.damping > self.gptq_kw["percdamp"] else ""
        else:
            Q, params = q.rtn(W)
        if not torch.isfinite(Q).all():
            raise FloatingPointError(f"quantizing {name} to {wspec} produced nan/inf")
        # tensors in name order (a resume sorts what it reads back alike), and a layer quantized again
        # moved to the end, as its result is: a resumed run then holds the very same dicts
        self.result.packed.pop(name, None)
        if self.retain is None:
            # packed where Q is (on a GPU that is where the time is saved), stored on the CPU
            self.result.packed[name] = {k: v.cpu() for k, v in sorted(pack_weight(Q, q, params).items())}
            extra_bits, rinfo = 0.0, None
        else:
            self.result.packed[name] = dict(sorted(packed.items()))
        aspec = self.plan.act_spec(name)
        replace_module(self.model, name, QuantLinear.from_linear(lin, Q, wspec, aspec))
        if rinfo is not None:
            self.model.get_submodule(name).retain = rinfo["format"]
        if name in self.done:  # quantized again (sequential calibration: its group's guess was wrong)
            self.result.layers = [l for l in self.result.layers if l.name != name]
        self.done.add(name)
        lr = LayerResult(name, str(wspec), str(aspec) if aspec else None, tuple(W.shape),
                         q.describe_groups(W.shape[1]), q.bits_per_weight(W.shape[1]) + extra_bits,
                         _relative_error(W, Q, H), time.time() - ts, note, rinfo)
        self.result.layers.append(lr)
        if self.on_layer:
            self.on_layer(lr)


def _one_pass_fits(hidden: torch.Tensor, block: nn.Module) -> bool:
    """Whether running a block once over all calibration tokens fits comfortably in memory: a rough
    bound of a few activations of the widest linear plus eager attention scores."""
    tokens = hidden.shape[0] * (hidden.shape[1] if hidden.dim() > 2 else 1)
    width = max([max(m.in_features, m.out_features) for m in block.modules() if isinstance(m, nn.Linear)]
                + [hidden.shape[-1]])
    need = tokens * width * 4 * 10
    if hidden.dim() > 2:  # scores of an attention that materialises them, head size 64 assumed
        need += hidden.shape[0] * hidden.shape[1] ** 2 * max(1, hidden.shape[-1] // 64) * 4 * 2
    if hidden.is_cuda:
        free = torch.cuda.mem_get_info(hidden.device)[0]
    else:
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return False
    return need < free / 2


def _to_device(obj, dev):
    """A captured block input (or any nesting of tuples/lists/dicts of tensors) on ``dev``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(dev)
    if isinstance(obj, BlockInput):
        return BlockInput(obj.hidden.to(dev), _to_device(obj.args, dev), _to_device(obj.kwargs, dev))
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to_device(o, dev) for o in obj)
    if isinstance(obj, dict):
        return {k: _to_device(v, dev) for k, v in obj.items()}
    return obj


def _prepare_retention(model, plan, batches, retain, progress, gptq_kw=None):
    """Before any layer changes: Fisher scores (if asked) and the optimised per-layer ratios."""
    from .retention import fisher_saliency

    scores = None
    if retain.saliency == "fisher":
        names = [n for n, _ in model.named_modules() if plan.weight_spec(n) is not None
                 and isinstance(model.get_submodule(n), nn.Linear)]
        scores = fisher_saliency(model, batches, names)
    if retain.alloc == "optimized" and retain.ratios is None:
        from .retain_alloc import optimize_ratios

        alloc = optimize_ratios(model, plan, batches, retain.fmt, retain.ratio, retain.saliency,
                                retain.sens_seqs, progress, scores, retain.objective, retain.curves,
                                retain.grid, gptq_kw)
        retain.ratios = alloc.ratios
        retain.allocation = alloc.to_dict()
    return scores


# --- progress / resume -------------------------------------------------------------------------

def progress_bar(total: int, enabled: bool, initial: int = 0, desc: str = "blocks"):
    try:
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, desc=desc, disable=not enabled, leave=False)
    except ImportError:  # tqdm is optional
        class _Null:
            def update(self, n): ...
            def close(self): ...
        return _Null()


def _save_progress(d: Path, bi: int, hidden, result: QuantizationResult, names) -> None:
    """Block ``bi``'s packed layers and outputs, then progress.json naming them: replacing that file
    is the one step that moves a resume forward, so a kill at any point leaves a consistent folder
    (the outputs of block ``bi`` never sit under the name progress.json gives block ``bi - 1``'s)."""
    from safetensors.torch import save_file

    d.mkdir(parents=True, exist_ok=True)
    state = {f"{n}.weight.{k}": v.contiguous() for n in names for k, v in result.packed[n].items()}
    save_file(state, str(d / f"block_{bi:04d}.safetensors"))
    hidden_file = f"hidden_{bi:04d}.safetensors"
    save_file({f"h{i}": h.contiguous().cpu() for i, h in enumerate(hidden)}, str(d / "hidden.tmp"))
    (d / "hidden.tmp").replace(d / hidden_file)
    meta = {"done": bi, "hidden": hidden_file,
            "result": {k: v for k, v in result.to_dict().items() if k != "seconds"}}
    (d / "progress.tmp").write_text(json.dumps(meta))
    (d / "progress.tmp").replace(d / "progress.json")
    for old in d.glob("hidden*.safetensors"):  # earlier blocks' outputs, no longer named
        if old.name != hidden_file:
            old.unlink()


def _load_progress(d: Path, model: nn.Module, result: QuantizationResult) -> int:
    """Restore the finished blocks' quantized layers; returns the last finished block (-1: none)."""
    from safetensors.torch import load_file

    meta_path = d / "progress.json"
    if not meta_path.is_file():
        return -1
    meta = json.loads(meta_path.read_text())
    if meta["result"]["plan"] != result.plan or meta["result"]["method"] != result.method:
        warnings.warn(f"{d} holds progress of another plan/method; starting over", stacklevel=3)
        return -1
    packed = {}
    for bi in range(meta["done"] + 1):
        packed.update(load_file(str(d / f"block_{bi:04d}.safetensors")))
    for lr in meta["result"]["layers"]:
        lr["shape"] = tuple(lr["shape"])
        layer = LayerResult(**lr)
        result.layers.append(layer)
        prefix = f"{layer.name}.weight."
        result.packed[layer.name] = {k[len(prefix):]: v for k, v in sorted(packed.items()) if k.startswith(prefix)}
        wspec = QuantSpec.parse(layer.weight_spec)
        aspec = QuantSpec.parse(layer.act_spec) if layer.act_spec else None
        retain_fmt = layer.retain["format"] if layer.retain else None
        W = unpack_weight(result.packed[layer.name], wspec, layer.shape, retain=retain_fmt)
        replace_module(model, layer.name, QuantLinear.from_linear(model.get_submodule(layer.name), W, wspec, aspec))
        if retain_fmt:
            model.get_submodule(layer.name).retain = retain_fmt
    result.skipped.update(meta["result"]["skipped"])
    return int(meta["done"])


def _load_hidden(d: Path, n: int):
    from safetensors.torch import load_file

    # the outputs of the last finished block, as progress.json names them
    name = json.loads((d / "progress.json").read_text()).get("hidden", "hidden.safetensors")
    state = load_file(str(d / name))
    return [state[f"h{i}"] for i in range(n)]
