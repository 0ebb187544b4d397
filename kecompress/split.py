"""Splits: which weights form the fit hypothesis and which the reset hypothesis.

A split maps every parameter it touches to a bool mask of the same shape, True meaning
"fit hypothesis" (kept bit for bit across generations) and False "reset hypothesis"
(re-initialised at every generation). Two methods, as in Knowledge Evolution:

* KELS, kernel-level: the fit is the first ``ceil(rate*C)`` channels of every layer, so it is
  a slim dense sub-network that can be cut out (``kecompress.slice_fit``). Channels that are
  coupled (residual adds, concatenations, depthwise and grouped convolutions, flatten into a
  linear layer, the heads of timm's attention) are decided once per coupled group of
  torch-pruning's dependency graph; with ``align=N`` every group keeps a multiple of N channels
  (the block widths fast kernels use). A grouped convolution keeps whole groups by default
  (``grouped="whole-groups"``: a ``rate`` share of its groups at full group width, which runs fast)
  or the same narrower share of every group (``"narrow"``, the layout of splits made before).
* WELS, weight-level: every conv and linear weight is in the fit with probability ``rate``.
  The fit is sparse, not slim: dense runtimes do not run it any faster.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch_pruning as tp

from .attention import check_attention_group, qkv_heads
from .errors import KecompressError

METHODS = ("kels", "wels")
# How KELS cuts a grouped convolution: keep whole groups, or narrow every group alike.
GROUPED = ("whole-groups", "narrow")

_CONV = nn.modules.conv._ConvNd
_NORM = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.GroupNorm, nn.LayerNorm)
# Layers whose parameters KELS knows how to split along channels.
SPLITTABLE_LAYERS = (_CONV, nn.Linear, *_NORM, nn.PReLU)
# timm's token parameters: class, register and distillation tokens and position embeddings, shaped
# (1, tokens, channels) and put beside or added to the tokens, so their channels are the last
# dimension, the one torch-pruning cuts.
_TOKEN_PARAMETERS = ("cls_token", "reg_token", "dist_token", "pos_embed")


@dataclass
class Split:
    """The masks of one split, and how they were made.

    Attributes:
        method: ``"kels"`` or ``"wels"``.
        rate: the split rate in (0, 1]: the fraction of channels (KELS) or weights (WELS) in the fit.
        seed: the seed the split was drawn with (WELS draws from it; KELS is deterministic).
        masks: parameter name (as in ``model.named_parameters()``) -> bool tensor of that
            parameter's shape, True = fit hypothesis.
        align: KELS: every coupled group keeps a multiple of this many channels (1: the paper's rule).
        select: KELS: which channels a group keeps: ``"first"`` (the paper's rule) or the most
            important by ``"magnitude"``, ``"bn-scale"`` or ``"taylor"`` (:mod:`kecompress.shape`).
        widths: KELS: how many: ``"uniform"`` (``rate`` of every group) or ``"global"`` (one
            ranking across all groups, to the MAC budget ``fit_macs``).
        fit_macs: the fit's share of the dense network's MACs a ``"global"`` split was made for.
        grouped: KELS: how a grouped convolution is cut, ``"whole-groups"`` or ``"narrow"`` (:data:`GROUPED`).

    Example:
        >>> import torchvision
        >>> s = split(torchvision.models.resnet18(num_classes=10), "kels", 0.5,
        ...           example_inputs=torch.randn(1, 3, 64, 64))
        >>> s.masks["conv1.weight"].shape
        torch.Size([64, 3, 7, 7])
        >>> round(s.fit_fraction(), 2)
        0.25
    """

    method: str
    rate: float
    seed: int = 0
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    align: int = 1
    select: str = "first"
    widths: str = "uniform"
    fit_macs: float | None = None
    grouped: str = "whole-groups"

    def fit_count(self) -> int:
        """Number of parameter entries in the fit hypothesis.

        Example:
            >>> Split("wels", 0.5, masks={"w": torch.tensor([True, False])}).fit_count()
            1
        """
        return sum(int(mask.sum()) for mask in self.masks.values())

    def total_count(self) -> int:
        """Number of parameter entries the split covers (fit and reset together).

        Example:
            >>> Split("wels", 0.5, masks={"w": torch.tensor([True, False])}).total_count()
            2
        """
        return sum(mask.numel() for mask in self.masks.values())

    def fit_fraction(self) -> float:
        """Fraction of the covered parameter entries that are in the fit hypothesis.

        Example:
            >>> Split("wels", 0.5, masks={"w": torch.tensor([True, False])}).fit_fraction()
            0.5
        """
        return self.fit_count() / max(self.total_count(), 1)

    def fit_parameters(self, model: nn.Module) -> int:
        """Parameter entries of ``model``'s fit network: the split's fit entries, and every
        parameter the split leaves whole.

        Example:
            >>> Split("wels", 0.5, masks={"weight": torch.ones(2, 3, dtype=torch.bool).tril()}).fit_parameters(
            ...     nn.Linear(3, 2))
            5
        """
        return self.fit_count() + sum(param.numel() for param in model.parameters()) - self.total_count()

    def check_matches(self, model: nn.Module) -> None:
        """Raise a KecompressError unless every mask names a parameter of ``model`` with its shape.

        Example:
            >>> model = nn.Linear(3, 2)
            >>> split(model, "wels", 0.5).check_matches(model)
        """
        params = dict(model.named_parameters())
        missing = sorted(set(_covered_parameters(model, self.method)) - set(self.masks))
        if missing:
            raise KecompressError(
                f"the split has no mask for parameter '{missing[0]}' of this model: "
                "the split was made for another model; split this model instead")
        for name, mask in self.masks.items():
            if name not in params:
                raise KecompressError(
                    f"the split names parameter '{name}', which this model does not have: "
                    "the split was made for another model; split this model instead")
            if params[name].shape != mask.shape:
                raise KecompressError(
                    f"the split's mask for '{name}' has shape {tuple(mask.shape)} but the model's "
                    f"parameter has {tuple(params[name].shape)}: the split was made for another model")

    def to_dict(self) -> dict:
        """A plain dict of tensors and numbers, loadable with ``torch.load(weights_only=True)``.

        Example:
            >>> Split("wels", 0.5).to_dict()["method"]
            'wels'
        """
        return {"method": self.method, "rate": self.rate, "seed": self.seed, "align": self.align,
                "select": self.select, "widths": self.widths, "fit_macs": self.fit_macs, "grouped": self.grouped,
                "masks": dict(self.masks)}

    @classmethod
    def from_dict(cls, state: dict) -> "Split":
        """Rebuild a Split from :meth:`to_dict`'s output (a split saved before ``align``, ``select`` and
        ``widths`` existed has the paper's rule: 1, first, uniform; one saved before ``grouped``
        existed narrowed every group).

        Example:
            >>> Split.from_dict(Split("wels", 0.5).to_dict()).rate
            0.5
            >>> Split.from_dict({"method": "kels", "rate": 0.5, "seed": 0, "masks": {}}).grouped
            'narrow'
        """
        try:
            return cls(method=str(state["method"]), rate=float(state["rate"]), seed=int(state["seed"]),
                       masks={str(k): v.bool() for k, v in state["masks"].items()}, align=int(state.get("align", 1)),
                       select=str(state.get("select", "first")), widths=str(state.get("widths", "uniform")),
                       fit_macs=None if state.get("fit_macs") is None else float(state["fit_macs"]),
                       grouped=str(state.get("grouped", "narrow")))
        except (KeyError, TypeError, AttributeError) as error:
            raise KecompressError(f"not a kecompress split ({error!r}): make one with kecompress.split") from None

    def save(self, path: str | Path) -> None:
        """Write the split to ``path`` (a torch file of plain tensors).

        Example:
            >>> import tempfile, os
            >>> path = os.path.join(tempfile.mkdtemp(), "split.pt")
            >>> Split("wels", 0.5).save(path)
        """
        torch.save(self.to_dict(), path)

    @classmethod
    def load(cls, path: str | Path) -> "Split":
        """Read a split written by :meth:`save`; never runs code from the file.

        Example:
            >>> import tempfile, os
            >>> path = os.path.join(tempfile.mkdtemp(), "split.pt")
            >>> Split("wels", 0.5).save(path)
            >>> Split.load(path).method
            'wels'
        """
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # torch raises many types for a bad file
            raise KecompressError(f"cannot read split file {path}: {error.__class__.__name__}; "
                                  "it must be a split saved by kecompress") from None
        if not isinstance(state, dict):
            raise KecompressError(f"{path} does not hold a kecompress split")
        return cls.from_dict(state)


def check_rate(rate) -> float:
    """Return ``rate`` as a float, or raise a KecompressError unless it is a number in (0, 1].

    Example:
        >>> check_rate("0.5")
        0.5
    """
    try:
        value = float(rate)
    except (TypeError, ValueError):
        raise KecompressError(f"split rate must be a number in (0, 1], got {rate!r}: e.g. 0.5") from None
    if not 0.0 < value <= 1.0 or math.isnan(value):
        raise KecompressError(f"split rate must be in (0, 1], got {value}: e.g. 0.5")
    return value


def check_align(align) -> int:
    """Return ``align`` as an int, or raise a KecompressError unless it is a whole number of at least 1.

    Example:
        >>> check_align(16)
        16
    """
    if isinstance(align, bool) or not isinstance(align, numbers.Integral) or align < 1:
        raise KecompressError(f"align must be a whole number of channels, at least 1, got {align!r}: e.g. 8")
    return int(align)


def check_grouped(grouped) -> str:
    """Return ``grouped`` if it names a way to cut grouped convolutions (:data:`GROUPED`), else raise a KecompressError.

    Example:
        >>> check_grouped("narrow")
        'narrow'
    """
    if grouped not in GROUPED:
        raise KecompressError(f"grouped must be one of {', '.join(GROUPED)}, got {grouped!r}: e.g. whole-groups")
    return grouped


def split(model: nn.Module, method: str, rate: float, example_inputs=None, seed: int = 0, align: int = 1,
          grouped: str = "whole-groups") -> Split:
    """Split ``model`` into a fit and a reset hypothesis.

    Args:
        model: any PyTorch network. It is not modified (KELS runs one traced forward pass).
        method: ``"kels"`` (kernel-level, gives a slim fit that can be cut out) or ``"wels"``
            (weight-level, gives a sparse fit).
        rate: split rate in (0, 1]; 1 puts everything in the fit.
        example_inputs: an input the model accepts, for tracing (KELS only). When absent, a
            224x224 image batch of one is made from the first layer's input channels.
        seed: WELS draws its Bernoulli masks from a generator seeded with this.
        align: KELS: every coupled group keeps a multiple of ``align`` channels (its kept count
            rounded up, at least ``align``, never more than the group has), so that the slim
            network's layers have the widths fast kernels compute in blocks of (8 or 16, say).
            1, the default, is the paper's rule.
        grouped: KELS: ``"whole-groups"`` keeps ``ceil(rate * groups)`` of a grouped convolution's
            groups (rounded up as ``align`` says) at full group width, and the layers coupled to it
            follow; ``"narrow"`` keeps the first ``ceil(rate * width)`` channels of every group, a
            group narrower than the kernels' blocks, which runs little faster for its fewer MACs.

    Returns:
        A :class:`Split` whose ``masks`` cover every conv and linear layer (and, for KELS,
        every normalisation layer).

    Raises:
        KecompressError: unknown method, a rate outside (0, 1], an ``align`` below 1 or with
            WELS, or (KELS) a model that the dependency graph cannot split, naming the layer.

    Example:
        >>> import torchvision
        >>> model = torchvision.models.mobilenet_v2(num_classes=10)
        >>> s = split(model, "kels", 0.5, example_inputs=torch.randn(1, 3, 64, 64))
        >>> s.masks["classifier.1.weight"].sum(0).unique().tolist()  # all 10 logits, half the inputs
        [0, 10]
        >>> s = split(model, "kels", 0.5, example_inputs=torch.randn(1, 3, 64, 64), align=16)
        >>> int(s.masks["features.1.conv.2.weight"].sum())  # 16 channels: 8 at rate 0.5, aligned up to 16
        16
        >>> int(s.masks["features.2.conv.0.1.weight"].sum())  # 96 channels: 48, already a multiple of 16
        48
    """
    rate, align, grouped = check_rate(rate), check_align(align), check_grouped(grouped)
    method = str(method).lower()
    if method == "kels":
        masks = _kels_masks(model, rate, example_inputs, align, grouped)
    elif method == "wels":
        if align != 1:
            raise KecompressError(f"align {align} applies to KELS splits: a WELS fit is sparse and has no channel "
                                  "counts to align; drop align or use the KELS split")
        masks = _wels_masks(model, rate, seed)
    else:
        raise KecompressError(f"unknown split method {method!r}: use 'kels' or 'wels'")
    return Split(method=method, rate=rate, seed=int(seed), masks=masks, align=align, grouped=grouped)


def _covered_parameters(model: nn.Module, method: str) -> list[str]:
    """Names of the parameters a split of ``model`` by ``method`` has masks for."""
    if method == "wels":
        return [f"{name}.weight" if name else "weight" for name, module in model.named_modules()
                if isinstance(module, (_CONV, nn.Linear))]
    if method.startswith("edge-popup"):  # learned while training: the masks are read from the scores
        return []
    return [name for name, _ in model.named_parameters()]


def _wels_masks(model: nn.Module, rate: float, seed: int) -> dict[str, torch.Tensor]:
    # One generator for the whole model, walked in parameter order: same seed, same masks.
    generator = torch.Generator().manual_seed(int(seed))
    shapes = {f"{name}.weight" if name else "weight": module.weight.shape
              for name, module in model.named_modules() if isinstance(module, (_CONV, nn.Linear))}
    return {name: torch.rand(shapes[name], generator=generator) < rate
            for name in _covered_parameters(model, "wels")}


def default_example_inputs(model: nn.Module) -> torch.Tensor:
    """An input batch of one for ``model``, guessed from its first layer.

    Example:
        >>> default_example_inputs(nn.Sequential(nn.Conv2d(1, 4, 3))).shape
        torch.Size([1, 1, 224, 224])
    """
    for module in model.modules():
        if isinstance(module, nn.Conv1d):
            return torch.randn(1, module.in_channels, 224)
        if isinstance(module, nn.Conv2d):
            return torch.randn(1, module.in_channels, 224, 224)
        if isinstance(module, nn.Conv3d):
            return torch.randn(1, module.in_channels, 16, 112, 112)
        if isinstance(module, nn.Linear):
            return torch.randn(1, module.in_features)
    raise KecompressError("cannot guess an input for this model: pass example_inputs")


def trace_dependency_graph(model: nn.Module, example_inputs=None) -> tp.DependencyGraph:
    """Build torch-pruning's dependency graph of ``model``, with errors a user can act on.

    The model's train/eval mode and parameters are left as they were.

    Example:
        >>> graph = trace_dependency_graph(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)))
        >>> len(graph.module2node) > 0
        True
    """
    _check_splittable_layers(model)
    if example_inputs is None:
        example_inputs = default_example_inputs(model)
    if isinstance(example_inputs, torch.Tensor):
        # torch-pruning first tries model(*inputs): a bare tensor would be unpacked along the
        # batch and run a whole failing forward pass before the right call.
        example_inputs = (example_inputs,)
    was_training = model.training
    try:
        with torch.enable_grad():
            return tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs, verbose=False)
    except KecompressError:
        raise
    except Exception as error:
        raise KecompressError(
            f"the dependency graph could not trace the model ({error.__class__.__name__}: {error}); "
            "pass example_inputs the model accepts, or use the WELS split") from None
    finally:
        model.train(was_training)


def _check_splittable_layers(model: nn.Module) -> None:
    """Refuse parameters that KELS cannot place on a channel, and attention layers whose heads
    it cannot keep consistent, naming their layer."""
    qkv_heads(model)
    for module_name, module in model.named_modules():
        if isinstance(module, SPLITTABLE_LAYERS):
            extra = [name for name, _ in module.named_parameters(recurse=False) if name not in ("weight", "bias")]
            if extra:  # a conv's gain, say: cutting the layer's channels would leave it whole
                raise KecompressError(
                    f"layer '{module_name}' ({module.__class__.__name__}) holds parameter '{extra[0]}' beside its "
                    "weight and bias, which KELS does not cut with its channels: use the WELS split for this model")
            continue
        for param_name, param in module.named_parameters(recurse=False):
            if param_name in _TOKEN_PARAMETERS and param.dim() == 3 and param.shape[0] == 1:
                continue
            # A per-channel vector (a layer scale, say) follows its channels unambiguously;
            # anything else would be split along a guessed dimension, i.e. silently wrong.
            if sum(size > 1 for size in param.shape) > 1:
                raise KecompressError(
                    f"layer '{module_name}' ({module.__class__.__name__}) holds parameter "
                    f"'{param_name}' of shape {tuple(param.shape)}, which KELS cannot split along "
                    "channels: use the WELS split for this model")


def _kels_masks(model: nn.Module, rate: float, example_inputs, align: int, grouped: str) -> dict[str, torch.Tensor]:
    graph = trace_dependency_graph(model, example_inputs)
    return masks_of_groups(model, graph, list(kels_groups(graph, rate, align, grouped)))


def masks_of_groups(model: nn.Module, graph: tp.DependencyGraph, groups: list) -> dict[str, torch.Tensor]:
    """The KELS masks of ``model`` that keep, in every coupled group, the root channels given with
    it (``groups``: ``(group, kept root channels)`` pairs, as :func:`kels_groups` yields them, or
    chosen otherwise: by importance, say); every parameter no group touches stays whole.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
        >>> graph = trace_dependency_graph(model)
        >>> [group] = [group for group, _ in kels_groups(graph, 0.5)]
        >>> masks_of_groups(model, graph, [(group, {1, 5})])["0.bias"].tolist()
        [False, True, False, False, False, True]
    """
    name_of = {id(param): name for name, param in model.named_parameters()}
    masks = {}
    for module in model.modules():
        if isinstance(module, SPLITTABLE_LAYERS):
            for param in module.parameters(recurse=False):
                masks[name_of[id(param)]] = torch.ones(param.shape, dtype=torch.bool)
    for unwrapped in graph.unwrapped_parameters:
        masks[name_of[id(unwrapped.parameters)]] = torch.ones(unwrapped.parameters.shape, dtype=torch.bool)
    for group, kept in groups:
        for item in group.items:
            reset = [idx for idx, root in zip(item.idxs, item.root_idxs) if root not in kept]
            if reset:
                try:
                    _mark_reset(graph, masks, name_of, item.dep, reset)
                except IndexError:  # the graph's index mapping through a split or slice of channels
                    raise KecompressError(
                        f"the dependency graph maps channels of layer '{_layer_name(graph, item.dep.target.module)}' "
                        "beyond the layer's own (a split or slice of channels it does not follow): use the WELS "
                        "split for this model") from None
    # Groups that overlap (channels sliced or split in a way the graph does not follow, as in
    # GhostNet's ghost modules) can leave one layer's channel kept and a coupled layer's reset:
    # no slim network computes that. Refuse now, not when the fit is first cut out after training.
    for group, _ in groups:
        odd = _channel_votes(graph, group, masks, name_of)[1]
        if odd:
            name, _, _, coupled, _ = odd
            raise KecompressError(
                f"KELS cannot split this model consistently: parameter '{name}' shares channels with {coupled}, "
                "which another coupled group cuts differently (a split or slice of channels the dependency graph "
                "does not follow): use the WELS split for this model")
    return masks


def kels_groups(graph: tp.DependencyGraph, rate: float, align: int = 1, grouped: str = "whole-groups"):
    """Yield ``(group, fit_root_channels)`` for every coupled channel group that KELS splits.

    ``group`` is a torch-pruning group with full indices; ``fit_root_channels`` is the set of
    its root layer's channels in the fit (:func:`fit_channels`; with ``grouped="whole-groups"``
    a group coupled to a grouped convolution keeps whole groups of it). Groups that reach the
    model's output (the logits) stay whole and are not yielded.

    Example:
        >>> graph = trace_dependency_graph(nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2)))
        >>> [sorted(kept) for _, kept in kels_groups(graph, 0.5)]
        [[0, 1, 2]]
        >>> [sorted(kept) for _, kept in kels_groups(graph, 0.5, align=4)]
        [[0, 1, 2, 3]]
    """
    output_layers, qkv_blocks = _output_layers(graph), qkv_heads(graph.model)
    for group in graph.get_all_groups(root_module_types=(_CONV, nn.Linear)):
        if _reaches_output(graph, group, output_layers):
            continue
        check_attention_group(graph, group, qkv_blocks, _layer_name(graph, group.items[0].dep.target.module))
        channels = len(group.items[0].idxs)
        blocks = _channel_blocks(graph, group, channels, qkv_blocks)
        whole = _conv_group_blocks(graph, group, qkv_blocks) if grouped == "whole-groups" else 1
        if whole > 1:
            yield group, fit_channels(channels, rate, whole, align, whole_blocks=True)
        else:
            yield group, fit_channels(channels, rate, blocks, align)


def groups_from_masks(graph: tp.DependencyGraph, masks: dict[str, torch.Tensor]):
    """Yield ``(group, fit_root_channels)`` for every coupled channel group whose masks reset some
    of its channels, reading which from the masks of every layer in the group (the masks of
    ``graph.model``'s parameters, by name, as a :class:`Split` holds them).

    The masks may have been made any way (the rate rule, aligned, chosen by importance, edited
    by hand) as long as they agree with the graph: a coupled channel is in the fit in every
    layer that shares it, or in none. The graph must be uncut while the groups are read.

    Raises:
        KecompressError: masks that disagree about a coupled channel, a group that keeps none
            of its channels or different counts in the groups of a grouped convolution, or
            reset channels of the model's outputs; each names the layer.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
        >>> masks = {name: torch.ones_like(param, dtype=torch.bool) for name, param in model.named_parameters()}
        >>> masks["0.weight"][[1, 4]] = masks["0.bias"][[1, 4]] = masks["2.weight"][:, [1, 4]] = False
        >>> [sorted(kept) for _, kept in groups_from_masks(trace_dependency_graph(model), masks)]
        [[0, 2, 3, 5]]
    """
    name_of = {id(param): name for name, param in graph.model.named_parameters()}
    output_layers, qkv_blocks = _output_layers(graph), qkv_heads(graph.model)
    for group in graph.get_all_groups(root_module_types=(_CONV, nn.Linear)):
        channels = len(group.items[0].idxs)
        kept = _fit_root_channels(graph, group, masks, name_of)
        if len(kept) == channels:
            continue
        layer = _layer_name(graph, group.items[0].dep.target.module)
        check_attention_group(graph, group, qkv_blocks, layer)
        if _reaches_output(graph, group, output_layers):
            raise KecompressError(f"the split resets output channels of layer '{layer}', which are the model's "
                                  "outputs: they stay whole in a KELS fit; keep them in the fit")
        if not kept:
            raise KecompressError(f"the split resets every output channel of layer '{layer}' and the layers "
                                  "coupled to it: a fit network needs at least one; keep one in the fit")
        blocks = _channel_blocks(graph, group, channels, qkv_blocks)
        counts = sorted({sum(1 for channel in kept if channel * blocks // channels == block) for block in range(blocks)})
        if len(counts) > 1 and not (counts == [0, channels // blocks] and _conv_group_blocks(graph, group, qkv_blocks) > 1):
            raise KecompressError(f"the split keeps {' or '.join(map(str, counts))} channels in the {blocks} groups "
                                  f"of the grouped channels of layer '{layer}': a grouped convolution must keep "
                                  "the same number in every group, or whole groups and none of the others")
        yield group, kept


def _reaches_output(graph: tp.DependencyGraph, group, output_layers: set) -> bool:
    return any(item.dep.target.module in output_layers and graph.is_out_channel_pruning_fn(item.dep.handler)
               for item in group.items)


def _layer_name(graph: tp.DependencyGraph, module) -> str:
    return graph._module2name.get(module) or graph._param_to_name.get(module, "?")


def _output_layers(graph: tp.DependencyGraph) -> set:
    """The conv and linear layers whose channels are the model's outputs (the logits).

    Walks back from the graph's terminal nodes through operations without weights (and
    normalisation layers) to the first conv or linear layer on each path.
    """
    stack = [node for node in graph.module2node.values() if not node.outputs]
    seen, layers = set(), set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if isinstance(node.module, (_CONV, nn.Linear)):
            layers.add(node.module)
        else:
            stack.extend(node.inputs)
    return layers


def fit_channels(channels: int, rate: float, blocks: int = 1, align: int = 1, whole_blocks: bool = False) -> set[int]:
    """The channels of a coupled group that belong to the fit hypothesis.

    The first ``ceil(rate * channels / blocks)`` channels of each of ``blocks`` equal blocks:
    a grouped convolution must keep the same number of channels in every group. With
    ``whole_blocks``, instead the first ``ceil(rate * blocks)`` blocks whole (a grouped
    convolution keeps whole groups). With ``align``, the count kept is rounded up so that the
    group keeps a multiple of ``align`` channels (at least ``align``, never more than it has).
    torch-pruning's ``round_to`` rounds down instead; up keeps at least the paper's fit.

    Example:
        >>> sorted(fit_channels(8, 0.5))
        [0, 1, 2, 3]
        >>> sorted(fit_channels(8, 0.5, blocks=2))
        [0, 1, 4, 5]
        >>> len(fit_channels(24, 0.5, align=8)), len(fit_channels(24, 0.5, blocks=2, align=8))
        (16, 16)
        >>> sorted(fit_channels(8, 0.5, blocks=4, whole_blocks=True))  # 2 of 4 groups of 2
        [0, 1, 2, 3]
        >>> len(fit_channels(24, 0.5, blocks=6, align=8, whole_blocks=True))  # 3 groups of 4, aligned up to 4
        16
    """
    size = channels // blocks
    if whole_blocks:
        step = align // math.gcd(align, size)  # blocks, so that together they keep a multiple of align
        return set(range(min(blocks, -(-math.ceil(rate * blocks) // step) * step) * size))
    step = align // math.gcd(align, blocks)  # per block, so that the blocks together keep a multiple of align
    keep = min(size, -(-math.ceil(rate * size) // step) * step)
    return {block * size + offset for block in range(blocks) for offset in range(keep)}


def _channel_blocks(graph: tp.DependencyGraph, group, channels: int, qkv_blocks: dict) -> int:
    """How many equal blocks the group's channels fall into: the lcm of its layers' groups, and
    of the query, key and value blocks of every head of an attention layer (``qkv_blocks``, from
    :func:`~kecompress.attention.qkv_heads`)."""
    blocks = 1
    for item in group.items:
        module = item.dep.target.module
        pruner = graph.get_pruner_of_module(module)
        if pruner is None or _is_depthwise(module):  # depthwise: every channel its own group
            continue
        if module in qkv_blocks and graph.is_out_channel_pruning_fn(item.dep.handler):
            blocks = math.lcm(blocks, qkv_blocks[module])
        elif graph.is_out_channel_pruning_fn(item.dep.handler):
            blocks = math.lcm(blocks, pruner.get_out_channel_groups(module))
        else:
            blocks = math.lcm(blocks, pruner.get_in_channel_groups(module))
    if channels % blocks:
        raise KecompressError(
            f"cannot split {channels} coupled channels into {blocks} equal groups (layer "
            f"'{_layer_name(graph, group.items[0].dep.target.module)}'): use the WELS split")
    return blocks


def _conv_group_blocks(graph: tp.DependencyGraph, group, qkv_blocks: dict) -> int:
    """How many blocks of whole groups of every grouped convolution coupled in ``group`` its channels
    fall into (the gcd of their groups); 1 when it has none, or holds the heads of an attention
    layer, whose query, key and value must each keep the same share."""
    blocks = 0
    for item in group.items:
        module = item.dep.target.module
        if module in qkv_blocks:
            return 1
        if isinstance(module, _CONV) and module.groups > 1 and not _is_depthwise(module):
            blocks = math.gcd(blocks, module.groups)
    return max(blocks, 1)


def has_grouped_convs(model: nn.Module) -> bool:
    """Whether ``model`` has a grouped convolution that is not depthwise (whose cut ``grouped`` chooses).

    Example:
        >>> has_grouped_convs(nn.Conv2d(8, 8, 3, groups=2)), has_grouped_convs(nn.Conv2d(8, 8, 3, groups=8))
        (True, False)
    """
    return any(isinstance(module, _CONV) and module.groups > 1 and not _is_depthwise(module)
               for module in model.modules())


def _is_depthwise(module) -> bool:
    return isinstance(module, _CONV) and module.groups == module.out_channels and module.groups > 1


def _mark_reset(graph, masks, name_of, dep, reset: list[int]) -> None:
    """Set the masks of the entries that channels ``reset`` of ``dep``'s layer touch to False."""
    module = dep.target.module
    idx = torch.tensor(sorted(set(reset)))
    if isinstance(module, nn.Parameter):
        masks[name_of[id(module)]].index_fill_(dep.target.pruning_dim, idx, False)
        return
    if not isinstance(module, SPLITTABLE_LAYERS):
        return  # an operation without parameters (add, concat, reshape, ...)
    weight_mask = masks[name_of[id(module.weight)]] if getattr(module, "weight", None) is not None else None
    bias_mask = masks[name_of[id(module.bias)]] if getattr(module, "bias", None) is not None else None
    is_output = graph.is_out_channel_pruning_fn(dep.handler)

    if isinstance(module, _CONV):
        if _is_depthwise(module):  # input channel i is output channel i
            weight_mask[idx] = False
            if bias_mask is not None:
                bias_mask[idx] = False
        elif is_output:
            _mark_conv_channels(module, weight_mask, idx, out=True)
            if bias_mask is not None:
                bias_mask[idx] = False
        else:
            _mark_conv_channels(module, weight_mask, idx, out=False)
    elif isinstance(module, nn.Linear):
        if is_output:
            weight_mask[idx] = False
            if bias_mask is not None:
                bias_mask[idx] = False
        else:
            weight_mask[:, idx] = False
    else:  # normalisation layers and PReLU: per-channel parameters, channels on the last dim for LayerNorm
        for mask in (weight_mask, bias_mask):
            if mask is not None and mask.numel() > 1:
                mask.index_fill_(mask.dim() - 1 if isinstance(module, nn.LayerNorm) else 0, idx, False)


def _mark_conv_channels(conv: nn.Module, weight_mask: torch.Tensor, idx: torch.Tensor, out: bool) -> None:
    # A conv weight is (out, in/groups, *k), a transposed one (in, out/groups, *k): dim 0 holds
    # one side's channels in full, dim 1 the other side's position inside its group.
    if out != conv.transposed:
        weight_mask[idx] = False
        return
    per_group = (conv.out_channels if out else conv.in_channels) // conv.groups
    rows_per_group = weight_mask.shape[0] // conv.groups
    for channel in idx.tolist():
        group, position = divmod(channel, per_group)
        weight_mask[group * rows_per_group:(group + 1) * rows_per_group, position] = False


def _fit_root_channels(graph, group, masks, name_of) -> set[int]:
    """The group's root channels that every mask of the group keeps; refuses masks that disagree."""
    resets, odd = _channel_votes(graph, group, masks, name_of)
    if odd:
        name, side, channels, coupled, odd_in_fit = odd
        raise KecompressError(
            f"the split's mask of '{name}' {'keeps' if odd_in_fit else 'resets'} its {side} channels "
            f"{_channel_list(channels)}, which the dependency graph couples to {coupled}, whose masks "
            f"{'reset' if odd_in_fit else 'keep'} them: a coupled channel is in the fit in every layer or in none; "
            "edit the masks of all of them together")
    channels = len(group.items[0].idxs)
    return set(range(channels)) - set(resets)


def _channel_votes(graph, group, masks, name_of) -> tuple[dict, tuple | None]:
    """The group's root channels that some mask resets (root -> parameter names), and the odd one
    out where masks disagree about a channel: ``(name, side, its channels, coupled names,
    odd_in_fit)``, else None."""
    # Every parameter that holds some of the group's channels votes on them: kept or reset.
    votes = []  # (parameter name, side, own channel indices, root channel indices, kept)
    for item in group.items:
        side = "output" if graph.is_out_channel_pruning_fn(item.dep.handler) else "input"
        for name, kept in _channels_in_fit(graph, masks, name_of, item.dep, item.idxs).items():
            votes.append((name, side, list(item.idxs), list(item.root_idxs), kept.tolist()))
    resets, keeps = {}, {}
    for name, _, _, roots, kept in votes:
        for root, in_fit in zip(roots, kept):
            (keeps if in_fit else resets).setdefault(root, set()).add(name)
    contested = sorted(set(resets) & set(keeps))
    if not contested:
        return resets, None
    first = contested[0]
    odd_in_fit = len(keeps[first]) < len(resets[first])  # the fewer voters are the odd ones out
    odd, others = (keeps, resets) if odd_in_fit else (resets, keeps)
    name, side, own, roots, kept = next(vote for vote in votes if vote[0] in odd[first] and first in vote[3])
    channels = [channel for channel, root, in_fit in zip(own, roots, kept)
                if root in contested and in_fit == odd_in_fit]
    coupled = ", ".join(f"'{other}'" for other in sorted(others[first])[:3])
    return resets, (name, side, channels, coupled, odd_in_fit)


def _channel_list(channels: list[int]) -> str:
    """``[3, 7]``, or the first eight and the count: an error message stays one readable line."""
    shown = ", ".join(map(str, channels[:8]))
    return f"[{shown}]" if len(channels) <= 8 else f"[{shown}, ... ({len(channels)} in all)]"


def _channels_in_fit(graph, masks, name_of, dep, idxs) -> dict[str, torch.Tensor]:
    """Whether the mask of each parameter of ``dep``'s layer keeps channels ``idxs`` of the layer:
    what :func:`_mark_reset` writes, read back."""
    module = dep.target.module
    idx = torch.as_tensor([int(i) for i in idxs], dtype=torch.long)
    if isinstance(module, nn.Parameter):
        name = name_of[id(module)]
        return {name: _kept_along(masks[name], dep.target.pruning_dim)[idx]}
    if not isinstance(module, SPLITTABLE_LAYERS):
        return {}  # an operation without parameters (add, concat, reshape, ...)
    weight = name_of[id(module.weight)] if getattr(module, "weight", None) is not None else None
    bias = name_of[id(module.bias)] if getattr(module, "bias", None) is not None else None
    is_output = graph.is_out_channel_pruning_fn(dep.handler)
    if isinstance(module, (_CONV, nn.Linear)):
        if isinstance(module, _CONV) and not _is_depthwise(module) and is_output == module.transposed:
            kept = {weight: _kept_in_groups(masks[weight], module.groups)}  # see _mark_conv_channels
        else:
            kept = {weight: _kept_along(masks[weight], 1 if isinstance(module, nn.Linear) and not is_output else 0)}
        if bias is not None and (is_output or _is_depthwise(module)):
            kept[bias] = _kept_along(masks[bias], 0)
    else:  # normalisation layers and PReLU, as in _mark_reset
        kept = {name: _kept_along(masks[name], masks[name].dim() - 1 if isinstance(module, nn.LayerNorm) else 0)
                for name in (weight, bias) if name is not None and masks[name].numel() > 1}
    return {name: along[idx] for name, along in kept.items()}


def _kept_along(mask: torch.Tensor, dim: int) -> torch.Tensor:
    """Which indices along ``dim`` the mask keeps any entry of."""
    return mask.movedim(dim, 0).reshape(mask.shape[dim], -1).any(dim=1)


def _kept_in_groups(weight_mask: torch.Tensor, groups: int) -> torch.Tensor:
    """Which channels of a conv's grouped side (dim 1: the position inside the group) the mask keeps."""
    rows = weight_mask.shape[0] // groups
    return weight_mask.reshape(groups, rows, weight_mask.shape[1], -1).any(dim=3).any(dim=1).flatten()


def kept_indices(mask: torch.Tensor) -> list[torch.Tensor] | None:
    """Along each dimension of a mask, the indices it keeps; None unless the mask is exactly the
    block they span (whole channels, as KELS keeps them).

    Example:
        >>> mask = torch.zeros(4, 3, dtype=torch.bool)
        >>> mask[:2, [0, 2]] = True
        >>> kept_indices(mask)
        [tensor([0, 1]), tensor([0, 2])]
        >>> mask[3, 1] = True
        >>> kept_indices(mask) is None
        True
    """
    indices = [_kept_along(mask, dim).nonzero().flatten() for dim in range(mask.dim())]
    return indices if torch.equal(block_mask(mask.shape, indices), mask) else None


def block_mask(shape, indices: list[torch.Tensor]) -> torch.Tensor:
    """The bool mask of ``shape`` that keeps the block ``indices`` span (one index tensor a dimension).

    Example:
        >>> block_mask((2, 3), [torch.tensor([1]), torch.tensor([0, 2])]).int()
        tensor([[0, 0, 0],
                [1, 0, 1]], dtype=torch.int32)
    """
    block = torch.ones((), dtype=torch.bool)
    for size, kept in zip(shape, indices):
        along = torch.zeros(size, dtype=torch.bool)
        along[kept] = True
        block = block.unsqueeze(-1) & along
    return block
