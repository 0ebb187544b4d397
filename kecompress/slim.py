"""The fit hypothesis as a network of its own: cut out of a KELS split as a real, smaller
``nn.Module`` (:func:`slice_fit`), or, measured and saved by a run, with BatchNorm statistics of
its own (:func:`fit_network`)."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
from torch.optim.swa_utils import update_bn

from . import distributed
from .attention import resize_heads
from .config import FIT_BATCHNORM
from .edge_popup import EDGE_POPUP_METHODS, found_network
from .errors import KecompressError
from .evaluation import eval_mode
from .seeds import batchnorm_seed, rank_seed, seed_loader
from .split import (_CONV, Split, _is_depthwise, default_example_inputs, groups_from_masks, kept_indices,
                    split as make_split, trace_dependency_graph)


def slice_fit(model: nn.Module, split: Split, example_inputs=None) -> nn.Module:
    """Return a new module that holds only the fit hypothesis of a KELS split.

    Every conv, linear and normalisation layer loses exactly the channels the split's masks mark
    as reset, however they were chosen (the rate rule, aligned, by importance, by hand);
    channels coupled by residual adds, concatenations, depthwise and grouped convolutions or a
    flatten are cut once per coupled group through torch-pruning's dependency graph, and every
    layer of a group must agree on them. ``model`` is left untouched.

    For networks with BatchNorm, the result computes exactly what ``model`` computes with the
    reset hypothesis zeroed (to float round-off). With LayerNorm or GroupNorm over channels it
    cannot (zeroed channels change the statistics): the sliced network *is* the fit hypothesis.

    Args:
        model: the dense model the split was made for.
        split: a KELS :class:`~kecompress.Split` of ``model``.
        example_inputs: an input the model accepts, for tracing (default: as in ``split``).

    Returns:
        The slim fit network, in the mode (train/eval) ``model`` was in.

    Raises:
        KecompressError: a WELS split (sparse, not slim), a split of another model, a mask that
            is not whole channels or disagrees with the layers coupled to it (naming the layer and
            the channels), a model the dependency graph cannot handle, or a cut network that does not
            run on ``example_inputs`` (a layer with a channel count of its own).

    Example:
        >>> import torch, torchvision, kecompress
        >>> model = torchvision.models.resnet18(num_classes=10)
        >>> s = kecompress.split(model, "kels", 0.5, example_inputs=torch.randn(1, 3, 64, 64))
        >>> fit = slice_fit(model, s, example_inputs=torch.randn(1, 3, 64, 64))
        >>> fit.conv1.out_channels, fit.fc.in_features, fit.fc.out_features
        (32, 256, 10)
    """
    if split.method != "kels":
        raise KecompressError(
            f"a {split.method.upper()} split cannot be sliced: its fit hypothesis is sparse, not slim, "
            "so no smaller dense network computes it; use a KELS split to get a slim network, or "
            "evaluate the WELS fit as a masked dense model (kecompress.prune.fit_hypothesis)")
    split.check_matches(model)
    for name, mask in split.masks.items():
        if kept_indices(mask) is None:
            raise KecompressError(f"the split's mask of '{name}' does not keep whole channels, so no slim network "
                                  "computes it: a KELS mask keeps every entry of a kept channel and none of a reset one")
    if example_inputs is None:
        example_inputs = default_example_inputs(model)
    fit = _cut(model, copy.deepcopy(model), split, example_inputs)
    _check_cut_matches_masks(model, fit, split)
    _check_cut_runs(fit, example_inputs)
    return fit


def slice_fit_shape(model: nn.Module, split: Split, example_inputs=None) -> nn.Module:
    """The network :func:`slice_fit` cuts, on the meta device: its shapes without its weights.

    Nothing is copied and nothing computed but shapes, so it is several times faster than
    :func:`slice_fit`: for counting the fit's MACs and parameters
    (:func:`kecompress.bench.count_macs_params`, which gives the same counts as for the real fit),
    as choosing a learned shape does. Unlike :func:`slice_fit` it checks only that every cut
    parameter keeps as many entries as its mask (not which ones), and does not run the network.

    Example:
        >>> import torch, torchvision, kecompress
        >>> model = torchvision.models.resnet18(num_classes=10)
        >>> s = kecompress.split(model, "kels", 0.5, example_inputs=torch.randn(1, 3, 32, 32))
        >>> shape = slice_fit_shape(model, s, example_inputs=torch.randn(1, 3, 32, 32))
        >>> shape.conv1.weight.device.type, shape.conv1.out_channels, shape.fc.in_features
        ('meta', 32, 256)
    """
    if example_inputs is None:
        example_inputs = default_example_inputs(model)
    # deepcopy takes each tensor from the memo: the copy's parameters and buffers are weightless meta tensors
    memo = {id(tensor): _on_meta(tensor) for tensor in [*model.parameters(), *model.buffers()]}
    dense = copy.deepcopy(model, memo)
    inputs = example_inputs.to("meta") if isinstance(example_inputs, torch.Tensor) else \
        type(example_inputs)(tensor.to("meta") for tensor in example_inputs)
    fit = _cut(dense, copy.deepcopy(dense), split, inputs)
    for name, param in fit.named_parameters():
        if param.numel() != int(split.masks[name].sum()):
            raise _uncuttable_mask(name)
    return fit


def _on_meta(tensor: torch.Tensor) -> torch.Tensor:
    meta = tensor.detach().to("meta")
    return nn.Parameter(meta, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else meta


def _cut(model: nn.Module, fit: nn.Module, split: Split, example_inputs) -> nn.Module:
    """Cut ``fit``, a copy of ``model``, down to the split's kept channels, in place."""
    graph = trace_dependency_graph(fit, example_inputs)
    # Every group is read before any is cut: the masks number the channels of the uncut model.
    cuts = [(group.items[0], [channel for channel in range(len(group.items[0].idxs)) if channel not in kept])
            for group, kept in groups_from_masks(graph, split.masks)]
    for root, reset in cuts:
        graph.get_pruning_group(root.dep.target.module, root.dep.handler, reset).prune(record_history=False)
    _keep_whole_groups(model, fit, split)
    resize_heads(fit)
    return fit


def fit_sized(model: nn.Module, rate: float, align: int = 1, example_inputs=None, *,
              seed: int | None = None, grouped: str = "whole-groups") -> tuple[nn.Module, Split]:
    """A network of the shape of ``model``'s KELS fit at ``rate`` (and ``align``, ``grouped``), every layer
    re-initialised its own default way (``reset_parameters``, from ``seed`` when given), and the
    split that gives that shape: the fit-sized network trained from scratch, the baseline a slim
    network must beat (Liu et al., "Rethinking the Value of Network Pruning", ICLR 2019), and on
    small data often the best slim network there is (docs/results.md). ``model`` is left untouched.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))
        >>> slim, shaping = fit_sized(model, 0.5, seed=0)
        >>> slim[0].out_features, shaping.rate
        (8, 0.5)
    """
    shaping = make_split(model, "kels", rate, example_inputs=example_inputs, align=align, grouped=grouped)
    return fit_shaped(model, shaping, example_inputs, seed=seed), shaping


def fit_shaped(model: nn.Module, shaping: Split, example_inputs=None, *, seed: int | None = None) -> nn.Module:
    """A network of the shape of ``model``'s fit under the KELS split ``shaping`` (any split: a
    learned one, another run's), every layer re-initialised its own default way (from ``seed``
    when given): that architecture trained from scratch, Liu et al.'s test of whether a pruned
    architecture, not its inherited weights, is what helps. ``model`` is left untouched.

    Example:
        >>> import kecompress
        >>> model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))
        >>> fit_shaped(model, kecompress.split(model, "kels", 0.25), seed=0)[0].out_features
        4
    """
    slim = slice_fit(model, shaping, example_inputs=example_inputs)
    if seed is not None:
        torch.manual_seed(seed)
    for module in slim.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    return slim


def _keep_whole_groups(model: nn.Module, fit: nn.Module, split: Split) -> None:
    """Cut the grouped convolutions whose masks keep whole groups down to those groups.

    torch-pruning cuts a grouped convolution as if every group kept the same positions (its
    input side keeps the first positions of one group): right for narrowed groups, wrong for
    whole ones, so these layers are cut again from the dense layer, with fewer groups.
    """
    cut = dict(fit.named_modules())
    for name, conv in model.named_modules():
        if not isinstance(conv, _CONV) or conv.groups == 1 or _is_depthwise(conv):
            continue
        mask = split.masks[f"{name}.weight"]
        kept = mask.reshape(conv.groups, -1).any(dim=1).nonzero().flatten().tolist()
        if len(kept) == conv.groups:
            continue  # every group kept, whole or narrowed alike: torch-pruning's cut is right
        # dim 0 of a grouped weight holds its groups one after the other, conv or transposed alike
        rows, outputs = mask.shape[0] // conv.groups, conv.out_channels // conv.groups
        layer = cut[name]
        with torch.no_grad():
            layer.weight = nn.Parameter(torch.cat([conv.weight[g * rows:(g + 1) * rows] for g in kept]))
            if conv.bias is not None:
                layer.bias = nn.Parameter(torch.cat([conv.bias[g * outputs:(g + 1) * outputs] for g in kept]))
        layer.in_channels = len(kept) * conv.in_channels // conv.groups
        layer.out_channels = len(kept) * outputs
        layer.groups = len(kept)


def _check_cut_runs(fit: nn.Module, example_inputs) -> None:
    """Refuse a cut network that no longer runs: a layer that keeps a channel count of its own
    (a stored shape, say) that cutting its parameters did not change."""
    inputs = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    try:
        with torch.no_grad(), eval_mode(fit):
            fit(*inputs)
    except Exception as error:  # the mismatch surfaces as any of several types
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise KecompressError(f"the fit network cut out of this model does not run ({reason}): one of its layers "
                              "keeps a channel count that slicing does not update; use the WELS split for this "
                              "model") from None


def _check_cut_matches_masks(model: nn.Module, fit: nn.Module, split: Split) -> None:
    """Refuse a cut that kept other entries than the masks do: masks that reset channels no
    coupled group holds (the model's input channels, say) cannot be cut."""
    dense = dict(model.named_parameters())
    for name, param in fit.named_parameters():
        if not torch.equal(dense[name].detach()[split.masks[name]], param.detach().flatten()):
            raise _uncuttable_mask(name)


def _uncuttable_mask(name: str) -> KecompressError:
    return KecompressError(f"the split's mask of '{name}' resets entries that slicing cannot cut (the "
                           "model's input channels, say, which belong to no coupled group): keep them in the fit")


def fit_network(model: nn.Module, split: Split, train_loader=None, *, fit_batchnorm: str = "re-estimated",
                seed: int = 0, device: torch.device | str = "cpu", example_inputs=None) -> nn.Module:
    """The fit hypothesis of ``model`` as it is now, as a network of its own: what a run measures
    after every generation and saves at its end.

    KELS: the sliced slim network (:func:`slice_fit`). WELS: a copy of the dense network with the
    reset weights zeroed (a sparse network has no slim form). Edge-popup (a split of method
    ``"edge-popup"`` or ``"edge-popup-kels"`` of a model set up by
    :func:`kecompress.edge_popup.apply_edge_popup`): the network its scores choose now
    (:func:`kecompress.edge_popup.found_network`). With ``fit_batchnorm="re-estimated"``
    its BatchNorm statistics are then recomputed on ``train_loader`` for the fit network alone
    (the dense network gathered them with the reset channels feeding into the fit ones), from a
    seed of the run's own, so the same weights always give the same network; the random state
    and the loader's shuffle are left as they were. Under torchrun every rank must call it: the
    statistics of the ranks' parts of the data are averaged. ``model`` is left untouched.

    Example:
        >>> import kecompress
        >>> data = [(torch.randn(8, 4), torch.randint(0, 2, (8,)))]
        >>> model = nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2))
        >>> fit_network(model, kecompress.split(model, "kels", 0.5), data)[1].num_features
        8
    """
    if fit_batchnorm not in FIT_BATCHNORM:
        raise KecompressError(f"fit_batchnorm must be one of {', '.join(FIT_BATCHNORM)}, got {fit_batchnorm!r}")
    device = torch.device(device)
    if split.method == "kels":
        fit = slice_fit(model, split, example_inputs=None if example_inputs is None else example_inputs.to(device))
    elif split.method in EDGE_POPUP_METHODS:
        fit = found_network(model, split.rate, None if example_inputs is None else example_inputs.to(device))
    else:
        fit = copy.deepcopy(model)
        with torch.no_grad():
            for name, param in fit.named_parameters():
                if name in split.masks:
                    param.mul_(split.masks[name].to(param.device, param.dtype))
    if fit_batchnorm == "re-estimated":
        if train_loader is None:
            raise KecompressError("re-estimating the fit network's BatchNorm statistics needs the training data: "
                                  "pass train_loader, or fit_batchnorm=\"inherited\"")
        _reestimate_batchnorm(fit, train_loader, seed, device)
    return fit


def _reestimate_batchnorm(fit: nn.Module, train_loader, seed: int, device: torch.device) -> None:
    generator = getattr(train_loader, "generator", None)
    order = generator.get_state() if generator is not None else None
    cuda_devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_devices):
        seed_loader(train_loader, rank_seed(batchnorm_seed(seed), distributed.rank()))
        update_bn(train_loader, fit, device=device)
    if generator is not None:
        generator.set_state(order)
    # Under torchrun each rank saw its part of the training data: average the statistics, so
    # that every rank holds the same fit network (equal parts weigh equally).
    distributed.average_over_ranks([buffer for buffer in fit.buffers() if buffer.is_floating_point()])
