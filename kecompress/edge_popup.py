"""Edge-popup (Ramanujan et al., "What's hidden in a randomly weighted neural network?", CVPR 2020)
as a method of PyTorch's pruning API: a sub-network found in frozen random weights by learning scores.

Every weight keeps its random value (a signed Kaiming constant, ``±gain/sqrt(fan_in * k)`` for the
kept fraction ``k``); a score per weight is an ``nn.Parameter`` (``<name>_scores``); every forward
pass keeps the weights of the top-``k`` scores of each layer (by absolute value) and passes the
gradient straight through the top-k to the scores (allenai/hidden-networks' ``GetSubnet``). Train
the scores with SGD, momentum and a cosine schedule, no weight decay (the paper's settings); the
weights, frozen, never change.

* :class:`EdgePopup` / :func:`edge_popup`: weight level, one tensor; ``prune.global_unstructured(...,
  pruning_method=EdgePopup, amount=...)`` keeps the global top-k of the importance scores it is given.
* :func:`edge_popup_channels`: kernel level: a score per output channel of every coupled channel
  group (the groups of :func:`kecompress.split`'s KELS), the same number of channels kept as KELS
  keeps; :func:`scores_split` turns it into a KELS split that :func:`kecompress.slice_fit` cuts out.
* :func:`apply_edge_popup`, :func:`plain_network`, :func:`scores_split`: a whole model, as a run
  (``kecompress evolve --split edge-popup``) trains it.

Like every pruning hook, the mask is applied on every forward pass: to run the found network,
make it permanent (``prune.remove``, :func:`plain_network`) or cut it out (KELS form).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn
from torch.nn.utils import prune

from .attention import qkv_heads
from .errors import KecompressError
from .prune import _pruning_hook, kept_fraction
from .split import _CONV, SPLITTABLE_LAYERS, Split, _channel_blocks, check_align, check_rate, kels_groups, \
    trace_dependency_graph

# The split methods of a run whose masks are learned by edge-popup: weight level and kernel level.
EDGE_POPUP_METHODS = ("edge-popup", "edge-popup-kels")


class _TopScores(torch.autograd.Function):
    """1 for the ``keep`` largest scores of every row, 0 elsewhere; the gradient passes straight through."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, keep: int) -> torch.Tensor:
        # The keep-th largest as a threshold: a selection, faster than topk's partial sort on the CPU.
        threshold = scores.kthvalue(scores.shape[-1] - keep + 1, dim=-1, keepdim=True).values
        mask = (scores >= threshold).to(scores.dtype)
        if bool((mask.sum(-1) != keep).any()):  # ties at the threshold: topk breaks them
            mask = torch.zeros_like(scores).scatter_(-1, scores.topk(keep, dim=-1, sorted=False).indices, 1.0)
        return mask

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def top_scores(scores: torch.Tensor, keep: int, blocks: int = 1) -> torch.Tensor:
    """The 0/1 mask of ``scores``' shape that keeps the ``keep`` largest ``|scores|`` (``keep / blocks``
    in each of ``blocks`` equal blocks of the flattened scores); gradients pass straight through to
    ``scores`` (times the sign, as through ``abs``).

    Example:
        >>> top_scores(torch.tensor([0.1, -0.9, 0.5, 0.2]), keep=2)
        tensor([0., 1., 1., 0.])
        >>> top_scores(torch.tensor([0.1, -0.9, 0.5, 0.2]), keep=2, blocks=2)
        tensor([0., 1., 1., 0.])
    """
    flat = scores.abs().reshape(blocks, -1)
    return _TopScores.apply(flat, keep // blocks).reshape(scores.shape)


def kept_count(entries: int, rate: float) -> int:
    """How many of ``entries`` edge-popup keeps at split rate ``rate``: PyTorch's count of the
    entries pruned (``round(amount * entries)``) taken from the rest, at least one.

    Example:
        >>> kept_count(10, 0.3), kept_count(10, 0.25), kept_count(3, 0.01)  # 7.5 pruned rounds to 8, as in PyTorch
        (3, 2, 1)
    """
    return max(entries - round((1 - rate) * entries), 1)


class EdgePopup(prune.BasePruningMethod):
    r"""Edge-popup on one tensor: keep the weights of the top-``k`` learned scores.

    ``EdgePopup.apply(module, "weight", rate)`` (or :func:`edge_popup`) sets the weight to a signed
    Kaiming constant (the signs of its current values, ``gain/sqrt(fan_in * rate)``: the kept
    weights have the variance of a Kaiming-initialised layer), freezes it (``weight_orig``), adds
    the scores ``weight_scores`` (Kaiming-uniform), and from then on every forward pass computes
    ``weight = weight_orig * top_k(|weight_scores|)``, the gradient passing straight through to the
    scores; ``weight_mask`` holds the last mask. ``prune.remove`` makes the masked weight
    permanent (a trainable parameter again) and drops the scores.

    As a method of ``prune.global_unstructured`` it keeps the entries of the global top-``k`` of
    the importance scores (by absolute value; pass the learned scores as ``importance_scores``),
    a fixed mask like any other pruning method's.

    Args:
        rate (float): the fraction of the entries *kept*, in (0, 1) (KE's split rate).
        amount (float): instead of ``rate``, PyTorch's convention: the fraction *pruned*.

    Example:
        >>> conv = edge_popup(nn.Conv2d(4, 8, 3), "weight", rate=0.5)
        >>> int(conv.weight_mask.sum()), conv.weight_orig.requires_grad, conv.weight_scores.requires_grad
        (144, False, True)
    """

    PRUNING_TYPE = "unstructured"

    def __init__(self, rate=None, *, amount=None) -> None:
        self.rate = _check_open_rate(kept_fraction(rate, amount))

    def compute_mask(self, t, default_mask):
        r"""Return ``default_mask`` with all but the top-``k`` ``|t|`` of its entries still alive set to 0.

        Args:
            t (torch.Tensor): the scores (importance) of the entries.
            default_mask (torch.Tensor): mask of earlier pruning, same shape as ``t``.

        Returns:
            torch.Tensor: the combined mask, same shape and dtype as ``default_mask``.
        """
        alive = default_mask.flatten() != 0
        scores = t.detach().flatten().abs().masked_fill(~alive, -1.0)  # pruned entries never come back
        keep = kept_count(int(alive.sum()), self.rate)
        mask = torch.zeros_like(default_mask).flatten()
        mask[scores.topk(keep, sorted=False).indices] = 1
        return mask.view_as(default_mask)

    def apply_mask(self, module):
        r"""The masked tensor from the current scores (straight-through to them); updates ``<name>_mask``.

        Args:
            module (nn.Module): the module holding ``<name>_orig`` and ``<name>_scores``.

        Returns:
            torch.Tensor: ``<name>_orig`` times the top-k mask of the scores.
        """
        name = self._tensor_name
        scores = getattr(module, name + "_scores")
        mask = top_scores(scores.flatten(), kept_count(scores.numel(), self.rate)).view_as(scores)
        with torch.no_grad():
            getattr(module, name + "_mask").copy_(mask)
        return getattr(module, name + "_orig") * mask

    def remove(self, module):
        r"""Make the masked tensor permanent (a trainable parameter again) and drop the scores.

        Args:
            module (nn.Module): the module the method is applied to.
        """
        super().remove(module)
        del module._parameters[self._tensor_name + "_scores"]
        getattr(module, self._tensor_name).requires_grad_(True)

    @classmethod
    def apply(cls, module, name, rate=None, *, amount=None, signed_constant: bool = True):  # type: ignore[override]
        r"""Add edge-popup to ``module.name``: frozen (signed-constant) weights, learned scores.

        Args:
            module (nn.Module): module holding the tensor.
            name (str): name of the parameter inside ``module``, e.g. ``"weight"``.
            rate (float): the fraction kept, in (0, 1).
            amount (float): instead of ``rate``, the fraction pruned (PyTorch's convention).
            signed_constant (bool): set the weights to the signed Kaiming constant first (the
                paper's initialisation); False keeps their values (a pretrained network, say).

        Returns:
            EdgePopup: the hook now registered on ``module``.

        Raises:
            KecompressError: the tensor is already pruned, or the rate is outside (0, 1).
        """
        rate = _check_open_rate(kept_fraction(rate, amount))
        if _pruning_hook(module, name) is not None:
            raise KecompressError(f"'{name}' is already pruned: edge-popup learns a score for every entry of a "
                                  f"whole tensor; make the earlier pruning permanent with prune.remove(module, "
                                  f"'{name}') first")
        weight = getattr(module, name)
        if signed_constant:
            signed_kaiming_constant_(weight, rate)
        scores = nn.Parameter(torch.empty_like(weight))
        nn.init.kaiming_uniform_(scores.data.view(weight.shape[0], -1) if weight.dim() > 1 else scores.data.view(1, -1),
                                 a=math.sqrt(5))
        module.register_parameter(name + "_scores", scores)
        method = super().apply(module, name, rate=rate, importance_scores=scores.detach())
        getattr(module, name + "_orig").requires_grad_(False)
        return method


def edge_popup(module: nn.Module, name: str, rate: float, signed_constant: bool = True) -> nn.Module:
    r"""Apply :class:`EdgePopup` to ``module.name``; modifies ``module``.

    Args:
        module (nn.Module): module holding the tensor.
        name (str): name of the parameter inside ``module``, e.g. ``"weight"``.
        rate (float): the fraction kept, in (0, 1).
        signed_constant (bool): set the weights to the signed Kaiming constant first.

    Returns:
        nn.Module: ``module``, now pruned by learned scores.

    Example:
        >>> layer = edge_popup(nn.Linear(10, 10), "weight", rate=0.3)
        >>> int(layer.weight_mask.sum()), sorted(n for n, _ in layer.named_parameters())
        (30, ['bias', 'weight_orig', 'weight_scores'])
    """
    EdgePopup.apply(module, name, rate, signed_constant=signed_constant)
    return module


def signed_kaiming_constant_(weight: torch.Tensor, rate: float = 1.0) -> torch.Tensor:
    r"""Set ``weight`` in place to ``sign(weight) * gain / sqrt(fan_in * rate)``: the paper's signed
    Kaiming constant (ReLU gain), scaled so that the kept fraction ``rate`` of a layer has a
    Kaiming layer's variance. A 1-D tensor is left as it is.

    Example:
        >>> w = signed_kaiming_constant_(torch.tensor([[0.3, -2.0]]), rate=0.5)
        >>> w.tolist()
        [[1.4142135381698608, -1.4142135381698608]]
    """
    if weight.dim() < 2:
        return weight
    fan_in = weight[0].numel()
    with torch.no_grad():
        return weight.copy_(weight.sign() * math.sqrt(2.0) / math.sqrt(fan_in * rate))


class ChannelEdgePopup(prune.BasePruningMethod):
    r"""The kernel-level form's hook on one parameter: its mask is the product of the channel gates
    of the coupled groups it belongs to (:func:`edge_popup_channels` sets it up).

    ``gates`` lists ``(root, keep, blocks, where)``: ``root.channel_scores`` scores the group's
    channels, the top ``keep`` (``keep / blocks`` in each block) are kept, and ``where`` (a long
    tensor broadcastable to the parameter) names the group channel each entry belongs to, or the
    group's channel count for entries the group does not touch.
    """

    PRUNING_TYPE = "global"

    def __init__(self, gates: list) -> None:
        self.gates = gates

    def compute_mask(self, t, default_mask):
        r"""Return ``default_mask`` times the channel gates of the current scores.

        Args:
            t (torch.Tensor): the tensor (only its shape is used).
            default_mask (torch.Tensor): mask of earlier pruning, same shape as ``t``.

        Returns:
            torch.Tensor: the combined mask.
        """
        return default_mask * self._mask(default_mask.shape).detach()

    def _mask(self, shape) -> torch.Tensor:
        mask = None
        for index, (root, keep, blocks, where) in enumerate(self.gates):
            gate = top_scores(root.channel_scores, keep, blocks)
            if where.device != gate.device:  # the model moved (model.to(device)): move the index once
                where = where.to(gate.device)
                self.gates[index] = (root, keep, blocks, where)
            factor = torch.cat([gate, gate.new_ones(1)])[where]
            mask = factor if mask is None else mask * factor
        return mask.expand(shape)

    def apply_mask(self, module):
        r"""The masked tensor from the current channel scores (straight-through); updates ``<name>_mask``.

        Args:
            module (nn.Module): the module holding ``<name>_orig``.

        Returns:
            torch.Tensor: ``<name>_orig`` times the mask.
        """
        name = self._tensor_name
        orig = getattr(module, name + "_orig")
        mask = self._mask(orig.shape).to(orig.dtype)
        with torch.no_grad():
            getattr(module, name + "_mask").copy_(mask)
        return orig * mask

    @classmethod
    def apply(cls, module, name, gates):  # type: ignore[override]
        r"""Add the channel gates to ``module.name``.

        Args:
            module (nn.Module): module holding the tensor.
            name (str): name of the parameter inside ``module``.
            gates (list): see the class.

        Returns:
            ChannelEdgePopup: the hook now registered on ``module``.
        """
        return super().apply(module, name, gates=gates)


def edge_popup_channels(model: nn.Module, rate: float, example_inputs=None, align: int = 1,
                        signed_constant: bool = True) -> nn.Module:
    r"""Kernel-level edge-popup on ``model``; modifies it.

    Every coupled channel group that KELS splits (residual adds, concatenations, depthwise
    convolutions, a flatten: torch-pruning's dependency graph) gets a score per channel, the
    parameter ``channel_scores`` of the group's first conv or linear layer; every forward pass
    keeps the group's top ``len(kels fit)`` channels by score (as many as KELS keeps, so the found
    network has the KELS fit's shapes and MACs; per block for grouped convolutions), in every layer
    that shares them. Conv and linear weights are set to the signed Kaiming constant (unless
    ``signed_constant=False``) and every parameter but the scores is frozen.
    :func:`scores_split` gives the KELS split the scores choose, which
    :func:`kecompress.slice_fit` cuts out of :func:`plain_network`.

    Args:
        model (nn.Module): any network KELS splits; not pruned yet.
        rate (float): the fraction of channels kept, in (0, 1).
        example_inputs: an input the model accepts, for tracing.
        align (int): every group keeps a multiple of ``align`` channels, as KELS's ``align``.
        signed_constant (bool): set conv and linear weights to the signed Kaiming constant.

    Returns:
        nn.Module: ``model``, its channels now chosen by learned scores.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> net = edge_popup_channels(net, 0.5)
        >>> net[0].channel_scores.shape, int(net[0].weight_mask.any(1).sum()), int(net[2].weight_mask.any(0).sum())
        (torch.Size([8]), 4, 4)
    """
    rate, align = _check_open_rate(check_rate(rate)), check_align(align)
    _refuse_pruned(model)
    graph = trace_dependency_graph(model, example_inputs)
    name_of = {id(param): name for name, param in model.named_parameters()}
    params = dict(model.named_parameters())
    qkv_blocks = qkv_heads(model)
    gates: dict[str, list] = {}  # parameter name -> its gates
    roots = []
    for group, fit in kels_groups(graph, rate, align, "narrow"):
        channels = len(group.items[0].idxs)
        blocks = _channel_blocks(graph, group, channels, qkv_blocks)
        root = group.items[0].dep.target.module
        roots.append((root, channels))
        seen = set()
        for item in group.items:
            for name, where in _entry_channels(graph, item, name_of, params, channels):
                key = (name, tuple(where.shape))
                if key not in seen:  # a depthwise conv is in its group twice, as input and as output
                    seen.add(key)
                    gates.setdefault(name, []).append((root, len(fit), blocks, where))
    for param in model.parameters():
        param.requires_grad_(False)
    if signed_constant:
        for module in model.modules():
            if isinstance(module, (_CONV, nn.Linear)):
                signed_kaiming_constant_(module.weight, rate)
    for root, channels in roots:
        # Uniform, like a layer's Kaiming-uniform scores: a random first choice of channels.
        root.register_parameter("channel_scores", nn.Parameter(torch.rand(channels, device=root.weight.device)))
    for name, its_gates in gates.items():
        module_name, _, param_name = name.rpartition(".")
        module = model.get_submodule(module_name)
        ChannelEdgePopup.apply(module, param_name, its_gates)
    return model


def _entry_channels(graph, item, name_of, params, channels: int):
    """For each parameter of ``item``'s layer that the group touches: ``(name, where)``, ``where``
    naming the group channel of every entry (``channels`` for none), broadcastable to the parameter
    (the same cases as :func:`kecompress.split`'s KELS masks)."""
    module, dep = item.dep.target.module, item.dep
    if not isinstance(module, (nn.Parameter, *SPLITTABLE_LAYERS)):
        return []  # an operation without parameters (add, concat, reshape, ...)
    own = torch.full((_side_size(module, graph, dep),), channels, dtype=torch.long)
    own[torch.as_tensor([int(i) for i in item.idxs], dtype=torch.long)] = torch.as_tensor(
        [int(r) for r in item.root_idxs], dtype=torch.long)
    if isinstance(module, nn.Parameter):
        return [(name_of[id(module)], _along(own, dep.target.pruning_dim, module.dim()))]
    weight = name_of.get(id(module.weight)) if getattr(module, "weight", None) is not None else None
    bias = name_of.get(id(module.bias)) if getattr(module, "bias", None) is not None else None
    is_output = graph.is_out_channel_pruning_fn(dep.handler)
    entries = []
    if isinstance(module, _CONV):
        depthwise = module.groups == module.out_channels and module.groups > 1
        dims = params[weight].dim()
        if depthwise or is_output != module.transposed:
            entries.append((weight, _along(own, 0, dims)))
        else:  # the grouped side: position inside the group on dim 1, the group by row
            rows = params[weight].shape[0]
            per_group = own.numel() // module.groups
            group_of_row = torch.arange(rows) // (rows // module.groups)
            channel = group_of_row[:, None] * per_group + torch.arange(per_group)[None, :]
            entries.append((weight, own[channel].view(rows, per_group, *[1] * (dims - 2))))
        if bias is not None and (is_output or depthwise):
            entries.append((bias, own))
    elif isinstance(module, nn.Linear):
        entries.append((weight, _along(own, 0 if is_output else 1, 2)))
        if bias is not None and is_output:
            entries.append((bias, own))
    else:  # normalisation layers and PReLU: per-channel parameters (LayerNorm: the last dimension)
        for name in (weight, bias):
            if name is not None and params[name].numel() > 1:
                dims = params[name].dim()
                entries.append((name, _along(own, dims - 1 if isinstance(module, nn.LayerNorm) else 0, dims)))
    return entries


def _side_size(module, graph, dep) -> int:
    """The number of channels on the side of ``module`` that ``dep`` prunes."""
    if isinstance(module, nn.Parameter):
        return module.shape[dep.target.pruning_dim]
    is_output = graph.is_out_channel_pruning_fn(dep.handler)
    if isinstance(module, _CONV):
        return module.out_channels if is_output else module.in_channels
    if isinstance(module, nn.Linear):
        return module.out_features if is_output else module.in_features
    return module.weight.shape[-1 if isinstance(module, nn.LayerNorm) else 0]  # normalisation, PReLU


def _along(vector: torch.Tensor, dim: int, dims: int) -> torch.Tensor:
    shape = [1] * dims
    shape[dim] = -1
    return vector.view(shape)


def apply_edge_popup(model: nn.Module, method: str, rate: float, example_inputs=None, align: int = 1) -> nn.Module:
    r"""Set ``model`` up for edge-popup as a run trains it; modifies it.

    ``"edge-popup"``: :class:`EdgePopup` on every conv and linear weight (per-layer top-k), every
    other parameter frozen (BatchNorm at its initial scale 1 and shift 0: the paper's non-affine
    BatchNorm). ``"edge-popup-kels"``: :func:`edge_popup_channels`. Only the scores then train.

    Example:
        >>> net = apply_edge_popup(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), "edge-popup", 0.5)
        >>> sorted(name for name, p in net.named_parameters() if p.requires_grad)
        ['0.weight_scores', '2.weight_scores']
    """
    if method == "edge-popup-kels":
        return edge_popup_channels(model, rate, example_inputs, align)
    if method != "edge-popup":
        raise KecompressError(f"unknown edge-popup method {method!r}: use one of {', '.join(EDGE_POPUP_METHODS)}")
    if align != 1:
        raise KecompressError(f"align {align} applies to kernel-level splits: drop it, or use edge-popup-kels")
    _refuse_pruned(model)
    for param in model.parameters():
        param.requires_grad_(False)
    for module in model.modules():
        if isinstance(module, (_CONV, nn.Linear)):
            EdgePopup.apply(module, "weight", rate)
    return model


def scores_split(model: nn.Module, rate: float, seed: int = 0) -> Split:
    r"""The split the scores of an edge-popup model choose now, over the parameter names of its
    :func:`plain_network`: a WELS-style split (``method="wels"``, the masks of the conv and linear
    weights) for the weight level, a KELS split for the kernel level, which
    :func:`kecompress.slice_fit` cuts out. ``rate`` and ``seed`` are recorded in the split.

    Example:
        >>> net = apply_edge_popup(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), "edge-popup-kels", 0.5)
        >>> s = scores_split(net, 0.5)
        >>> s.method, sorted(s.masks), int(s.masks["0.weight"].sum())
        ('kels', ['0.bias', '0.weight', '2.bias', '2.weight'], 16)
    """
    masks, kernel_level = {}, None
    for module_name, module in model.named_modules():
        for hook in list(module._forward_pre_hooks.values()):
            if isinstance(hook, (EdgePopup, ChannelEdgePopup)):
                kernel_level = isinstance(hook, ChannelEdgePopup)
                with torch.no_grad():
                    hook.apply_mask(module)  # the mask of the scores as they are now
                name = f"{module_name}.{hook._tensor_name}" if module_name else hook._tensor_name
                masks[name] = getattr(module, hook._tensor_name + "_mask").detach().bool().cpu()
    if kernel_level is None:
        raise KecompressError("the model has no edge-popup scores: apply edge-popup first "
                              "(kecompress.edge_popup.apply_edge_popup)")
    if kernel_level:  # every parameter of a KELS split has a mask: the ones no group touches are whole
        for name, param in model.named_parameters():
            if not name.endswith(("_scores", "_orig")) and name not in masks:
                masks[name] = torch.ones(param.shape, dtype=torch.bool)
    return Split("kels" if kernel_level else "wels", rate, seed, masks, grouped="narrow")


def plain_network(model: nn.Module, keep_masked: bool = True) -> nn.Module:
    r"""A copy of an edge-popup model without the pruning hooks and scores: the parameter names of
    the architecture, the masked weights (``keep_masked``) or the random weights it was found in.
    ``model`` is left as it is.

    Example:
        >>> net = apply_edge_popup(nn.Sequential(nn.Linear(4, 8)), "edge-popup", 0.5)
        >>> sorted(plain_network(net).state_dict()), int(plain_network(net)[0].weight.count_nonzero())
        (['0.bias', '0.weight'], 16)
    """
    for module in model.modules():  # the masked tensor of the last forward pass cannot be deep-copied
        for hook in module._forward_pre_hooks.values():
            if isinstance(hook, prune.BasePruningMethod) and hook._tensor_name in module.__dict__:
                setattr(module, hook._tensor_name, getattr(module, hook._tensor_name).detach())
    plain = copy.deepcopy(model)
    for module in plain.modules():
        for hook in list(module._forward_pre_hooks.values()):
            if isinstance(hook, (EdgePopup, ChannelEdgePopup)):
                with torch.no_grad():
                    hook.apply_mask(module)  # the mask of the scores as they are now
                prune.remove(module, hook._tensor_name)
    for module in plain.modules():  # last: the hooks above read the channel scores of other layers
        module._parameters.pop("channel_scores", None)
    if not keep_masked:
        return _unmasked(model, plain)
    for param in plain.parameters():
        param.requires_grad_(True)
    return plain


def _unmasked(model: nn.Module, plain: nn.Module) -> nn.Module:
    """``plain`` with the random weights of ``model`` (``<name>_orig``) in place of the masked ones."""
    originals = {name[:-len("_orig")]: param for name, param in model.named_parameters() if name.endswith("_orig")}
    with torch.no_grad():
        for name, param in plain.named_parameters():
            if name in originals:
                param.copy_(originals[name])
            param.requires_grad_(True)
    return plain


def found_network(model: nn.Module, rate: float, example_inputs=None) -> nn.Module:
    r"""The network an edge-popup model has found, as a network of its own: the masked weights
    (weight level, a sparse network of the model's shapes), or the KELS fit its channel scores
    choose cut out as a slim network (kernel level). ``model`` is left as it is.

    Example:
        >>> net = apply_edge_popup(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), "edge-popup-kels", 0.5)
        >>> found_network(net, 0.5)[0].out_features
        4
    """
    from .slim import slice_fit  # slim measures runs through this module

    the_split = scores_split(model, rate)
    plain = plain_network(model)
    return slice_fit(plain, the_split, example_inputs) if the_split.method == "kels" else plain


def fit_parameter_count(model: nn.Module) -> int:
    r"""Parameter entries of the network an edge-popup model has found: its plain parameters less
    the masked-out entries (the scores and the masks do not count).

    Example:
        >>> net = apply_edge_popup(nn.Sequential(nn.Linear(4, 8)), "edge-popup", 0.5)
        >>> fit_parameter_count(net)  # 16 of 32 weights, and the 8 biases
        24
    """
    count = 0
    for name, param in model.named_parameters():
        if name.endswith("_orig"):
            count += int(model.get_buffer(name[:-len("_orig")] + "_mask").count_nonzero())
        elif not name.endswith("_scores") and not name.endswith("channel_scores"):
            count += param.numel()
    return count


def _check_open_rate(rate: float) -> float:
    if not 0 < rate < 1:
        raise KecompressError(f"edge-popup keeps a fraction in (0, 1) of the weights, got {rate}: e.g. 0.5")
    return rate


def _refuse_pruned(model: nn.Module) -> None:
    if prune.is_pruned(model):
        raise KecompressError("the model is already pruned: edge-popup needs unpruned parameters; make the pruning "
                              "permanent with torch.nn.utils.prune.remove first")
