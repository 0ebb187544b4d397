"""Attention heads under KELS: which attention layers a split can keep consistent, and how.

A multi-head attention layer reshapes the output channels of its ``qkv`` projection into
(query/key/value, head, head dimension) and computes each head on its own. Torch-pruning's
dependency graph sees that reshape as channels passing through, so the rate rule alone would
keep the first ``ceil(rate * 3 * dim)`` of them: all of the queries, half of the keys, none of
the values, a silently wrong split. KELS treats the ``3 * num_heads`` blocks of ``head_dim``
channels like the groups of a grouped convolution instead: every head keeps the first
``ceil(rate * head_dim)`` dimensions of its query, key and value (the output projection's
inputs follow the values), so the fit has every head, each narrower.

timm's ``Attention`` (its vision transformers') is the layer handled so: the sliced network
gets the narrower ``head_dim`` and keeps the dense network's ``scale`` (``head_dim ** -0.5``
of the dense width), so that its attention logits are the masked dense network's. Any other
layer with attention heads (a ``num_heads`` attribute, or a tensor of channels that reaches a
matrix product of attention) is refused, naming it.
"""

from __future__ import annotations

import sys

import torch.nn as nn

from .errors import KecompressError

# Nodes of torch-pruning's graph where channels meet as attention heads: the split of the qkv
# tensor into queries, keys and values, and the products of attention.
_ATTENTION_OPS = ("Unbind", "ScaledDotProduct", "Bmm")


def _timm_attention_class():
    """timm's plain multi-head attention layer, when timm is loaded (a model holding one loaded it)."""
    module = sys.modules.get("timm.layers.attention")
    return getattr(module, "Attention", None)


def qkv_heads(model: nn.Module) -> dict[nn.Linear, int]:
    """The qkv projections of the attention layers KELS can split, and the number of channel
    blocks of each (``3 * num_heads``: queries, keys and values of every head).

    Raises:
        KecompressError: an attention layer KELS cannot keep consistent, naming it.

    Example:
        >>> import timm
        >>> vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1)
        >>> [(vit.get_submodule("blocks.0.attn.qkv") is qkv, blocks) for qkv, blocks in qkv_heads(vit).items()]
        [(True, 9)]
    """
    supported = _timm_attention_class()
    heads = {}
    for name, module in model.named_modules():
        if not isinstance(getattr(module, "num_heads", None), int):
            continue
        if supported is None or type(module).forward is not supported.forward:
            raise KecompressError(
                f"layer '{name}' ({module.__class__.__name__}) computes attention in {module.num_heads} heads, which "
                "KELS keeps consistent only in timm's Attention (its vision transformers): use the WELS split "
                "for this model")
        extra = [option for option, layer in (("qk_norm", module.q_norm), ("scale_norm", module.norm),
                                               ("gated", getattr(module, "gate", None)))
                 if layer is not None and not isinstance(layer, nn.Identity)]
        if extra:
            raise KecompressError(
                f"layer '{name}' (Attention) is built with {extra[0]}, which mixes the channels of a head in a way "
                "KELS does not split: use the WELS split for this model, or a model without it")
        heads[module.qkv] = 3 * module.num_heads
    return heads


def check_attention_group(graph, group, qkv_blocks: dict, layer: str) -> None:
    """Refuse a coupled group of torch-pruning's ``graph`` whose channels meet as attention heads,
    unless it holds the outputs of a qkv projection :func:`qkv_heads` accepted: its heads would be
    split blindly.

    Example:
        >>> check_attention_group(None, type("Group", (), {"items": []})(), {}, "fc")  # no attention: nothing to refuse
    """
    if any(item.dep.target.module in qkv_blocks and graph.is_out_channel_pruning_fn(item.dep.handler)
           for item in group.items):
        return
    for item in group.items:
        operation = getattr(item.dep.target.module, "_grad_fn", None) or type(item.dep.target.module).__name__
        if any(op in str(operation) for op in _ATTENTION_OPS):
            raise KecompressError(
                f"the output channels of layer '{layer}' meet as attention heads ({operation} in the traced graph), "
                "which KELS keeps consistent only in timm's Attention: use the WELS split for this model")


def resize_heads(fit: nn.Module) -> None:
    """After a cut, give every timm attention layer of ``fit`` its narrower head width.

    The scale stays the dense network's, and the layer computes attention by its explicit
    formula, which uses that scale (the fused kernel would divide by the root of the new width).

    Example:
        >>> import timm, torch
        >>> attention = timm.layers.Attention(8, num_heads=2)
        >>> attention.qkv, attention.proj = nn.Linear(8, 18), nn.Linear(6, 8)  # heads cut from 4 to 3 dimensions
        >>> resize_heads(attention)
        >>> attention.head_dim, attention.scale == 4 ** -0.5, attention(torch.randn(1, 5, 8)).shape
        (3, True, torch.Size([1, 5, 8]))
    """
    supported = _timm_attention_class()
    if supported is None:
        return
    for module in fit.modules():
        if isinstance(module, supported):
            head_dim = module.qkv.out_features // (3 * module.num_heads)
            if head_dim != module.head_dim:
                module.head_dim, module.attn_dim, module.fused_attn = head_dim, head_dim * module.num_heads, False
