"""Rotations of whole models, each an exact rewrite of the float model (up to rounding).

* ``online_rotate(model, name)``: any linear ``y = x W^T`` becomes ``((x R)(W R)^T)``: the layer
  stores ``W R`` and rotates its input at run time (a ``QuantLinear`` with an ``InputTransform``).
  Works for every architecture; it is what encoders such as BERT/MiniLM get, since their post-
  LayerNorm residual stream (the LayerNorm output *is* the residual) admits no fused rotation.
* ``rotate_llama(model)``: the QuaRot-style fused rotation of a Llama-style decoder's residual
  stream. RMSNorm scales are folded into the linears that read the normed stream, lm_head is untied
  from the embeddings, and then every residual writer (embeddings, o_proj, down_proj) writes
  ``h Q`` and every reader (q/k/v, gate/up, lm_head) reads ``h Q`` with ``Q = diag(s) blockdiag(H_b)``
  (random signs; block ``b`` = the largest power of two dividing the hidden size by default, or the
  full hidden size when a Hadamard matrix of that order exists, e.g. 576 = 36·16). RMSNorm with unit
  weight commutes with an orthogonal Q (``||hQ|| = ||h||``), so the model computes the same function
  with no run-time cost. Optionally: V/O head-wise Hadamard rotation (fused, per head of
  ``head_dim``: attention mixes tokens, not features, so a per-head rotation of V is undone by
  o_proj's columns) and an online Hadamard on down_proj's input (the only reader not fed by a norm).
* ``max_logit_diff(model, rewrite, batch)``: run, rewrite, run again; report the largest change.
"""
from __future__ import annotations

from typing import Callable, Dict, Iterable, Optional

import torch
from torch import nn

from ..models.blocks import replace_module
from ..quant.linear import QuantLinear
from .hadamard import default_block, random_signs, rotate
from .paley import is_supported
from .online import InputTransform


def transform_layer(model: nn.Module, name: str) -> QuantLinear:
    """The linear ``name`` as a (not yet quantized) QuantLinear carrying an identity InputTransform,
    replacing an nn.Linear in place when needed."""
    lin = model.get_submodule(name)
    if not isinstance(lin, nn.Linear):
        raise TypeError(f"{name} is a {type(lin).__name__}, not an nn.Linear")
    if not isinstance(lin, QuantLinear):
        q = QuantLinear.from_linear(lin, lin.weight.detach(), None, None)
        replace_module(model, name, q)
        lin = q
    if lin.input_transform is None:
        lin.input_transform = InputTransform(lin.in_features).to(lin.weight.device)
    return lin


@torch.no_grad()
def online_rotate(model: nn.Module, name: str, block: Optional[int] = None, seed: Optional[int] = 0) -> dict:
    """Give linear ``name`` an online input rotation (after any smoothing scale it already has) and
    fold the rotation into its weight. ``block`` defaults to the largest power of two dividing the
    input size. Returns a record of what was done."""
    lin = transform_layer(model, name)
    tf = lin.input_transform
    tf.add_rotation(block, seed)
    signs = None if tf.signs is None else tf.signs.to(lin.weight.device)
    lin.weight.copy_(rotate(lin.weight.float(), tf.block, signs).to(lin.weight.dtype))
    return {"layer": name, "block": tf.block, "seed": seed}


def rotate_linears(model: nn.Module, names: Iterable[str], block: Optional[int] = None,
                   seed: int = 0, block_for: Optional[Callable[[str, int], Optional[int]]] = None) -> list:
    """Online rotation of each named linear; ``block_for(name, in_features)`` may choose per layer."""
    out = []
    for n in names:
        b = block_for(n, model.get_submodule(n).in_features) if block_for else block
        out.append(online_rotate(model, n, b, seed))
    return out


# --- Llama-style decoders ------------------------------------------------------------------------

def _llama_parts(model: nn.Module):
    core = getattr(model, "model", None)
    layers = getattr(core, "layers", None)
    head = getattr(model, "lm_head", None)
    ok = (core is not None and layers is not None and head is not None and hasattr(core, "embed_tokens")
          and hasattr(core, "norm") and all(hasattr(l, "self_attn") and hasattr(l, "mlp")
                                            and hasattr(l, "input_layernorm") for l in layers))
    if not ok:
        raise ValueError(f"{type(model).__name__} is not a Llama-style decoder (model.embed_tokens, "
                         "model.layers[i].{input_layernorm,self_attn,post_attention_layernorm,mlp}, model.norm, "
                         "lm_head); use online_rotate on its linears instead")
    for l in layers:
        for norm in (l.input_layernorm, l.post_attention_layernorm):
            if getattr(norm, "bias", None) is not None:
                raise ValueError("residual rotation needs RMSNorm (no bias/mean subtraction); found a norm with a bias")
    return core, layers, head


def _fold_norm(norm: nn.Module, readers: Iterable[nn.Linear]) -> None:
    """Move an RMSNorm's scale into the linears that read its output; the norm keeps unit weight."""
    g = norm.weight.detach().float()
    for lin in readers:
        lin.weight.copy_((lin.weight.float() * g[None, :]).to(lin.weight.dtype))
    norm.weight.fill_(1.0)


def untie_lm_head(model: nn.Module) -> bool:
    """Give lm_head its own copy of a weight shared with the embeddings; True if it was tied."""
    head = model.lm_head
    emb = model.get_input_embeddings()
    tied = head.weight is emb.weight or head.weight.data_ptr() == emb.weight.data_ptr()
    if tied:
        head.weight = nn.Parameter(emb.weight.detach().clone(), requires_grad=emb.weight.requires_grad)
    cfg = getattr(model, "config", None)
    if cfg is not None:
        cfg.tie_word_embeddings = False
        text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else None
        if text_cfg is not None and text_cfg is not cfg:
            text_cfg.tie_word_embeddings = False
    return tied


@torch.no_grad()
def rotate_llama(model: nn.Module, seed: int = 0, block: Optional[int] = None, *, heads: bool = True,
                 online_down: bool = True, down_block: Optional[int] = None, full_heads: bool = False) -> dict:
    """Fused residual rotation of a Llama-style decoder (see the module docstring), in place.
    ``block``: residual rotation block (default: largest power of two dividing the hidden size;
    any supported Hadamard order, e.g. the hidden size itself). ``full_heads``: also rotate heads
    whose head_dim is not a power of two but has a Hadamard matrix (e.g. 96 = 12·8).
    Returns a record: blocks, seed, which parts were rotated, whether lm_head was untied."""
    core, layers, head = _llama_parts(model)
    hidden = core.embed_tokens.weight.shape[1]
    b = default_block(hidden) if block is None else int(block)
    signs = random_signs(hidden, seed).to(core.embed_tokens.weight.device)
    tied = untie_lm_head(model)

    def readers(W):  # W Q  (input side)
        return rotate(W.float(), b, signs.to(W.device)).to(W.dtype)

    def writer(W):   # Q^T W  (output side): (W^T Q)^T
        return rotate(W.float().T, b, signs.to(W.device)).T.contiguous().to(W.dtype)

    # 1. fold norm scales into the readers (the final norm into lm_head)
    for l in layers:
        a, m = l.self_attn, l.mlp
        _fold_norm(l.input_layernorm, [a.q_proj, a.k_proj, a.v_proj])
        _fold_norm(l.post_attention_layernorm, [m.gate_proj, m.up_proj])
    _fold_norm(core.norm, [head])

    # 2. rotate the residual stream: embeddings and writers output h Q, readers take h Q
    emb = core.embed_tokens.weight
    emb.copy_(readers(emb))
    for l in layers:
        a, m = l.self_attn, l.mlp
        for lin in (a.q_proj, a.k_proj, a.v_proj, m.gate_proj, m.up_proj):
            lin.weight.copy_(readers(lin.weight))
        for lin in (a.o_proj, m.down_proj):
            lin.weight.copy_(writer(lin.weight))
            if lin.bias is not None:
                lin.bias.copy_(readers(lin.bias[None])[0])
    head.weight.copy_(readers(head.weight))

    record = {"kind": "residual", "block": b, "seed": seed, "hidden": hidden, "untied_lm_head": tied,
              "heads": None, "online_down": None}
    # 3. V/O per head: V' = V H_hd, o_proj columns of each head multiplied by H_hd (no signs, so the
    #    same matrix serves every query head sharing a KV head under grouped-query attention)
    if heads:
        hd = getattr(layers[0].self_attn, "head_dim", None)
        if hd and (hd == default_block(hd) or (full_heads and is_supported(hd))):
            for l in layers:
                a = l.self_attn
                a.v_proj.weight.copy_(rotate(a.v_proj.weight.float().T, hd).T.contiguous().to(a.v_proj.weight.dtype))
                if a.v_proj.bias is not None:
                    a.v_proj.bias.copy_(rotate(a.v_proj.bias[None].float(), hd)[0].to(a.v_proj.bias.dtype))
                a.o_proj.weight.copy_(rotate(a.o_proj.weight.float(), hd).to(a.o_proj.weight.dtype))
            record["heads"] = {"head_dim": hd}
    # 4. online rotation of down_proj's input (the MLP's hidden activations)
    if online_down:
        names = [f"model.layers.{i}.mlp.down_proj" for i in range(len(layers))]
        recs = rotate_linears(model, names, block=down_block, seed=seed + 1)
        record["online_down"] = {"block": recs[0]["block"], "seed": seed + 1}
    return record


# --- checks --------------------------------------------------------------------------------------

def batch_logits(model: nn.Module, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(**batch)
    if hasattr(out, "logits"):
        return out.logits
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def max_logit_diff(model: nn.Module, rewrite: Callable[[nn.Module], object], batch: Dict[str, torch.Tensor]):
    """Apply ``rewrite(model)`` in place; return (its result, max |logits after - logits before|,
    max |logits before|) on ``batch`` (last hidden state for encoders)."""
    was = model.training
    model.eval()
    before = batch_logits(model, batch).float()
    res = rewrite(model)
    after = batch_logits(model, batch).float()
    model.train(was)
    return res, float((after - before).abs().max()), float(before.abs().max())
