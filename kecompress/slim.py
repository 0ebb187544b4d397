"""Cut the fit hypothesis of a KELS split out of a model: a real, smaller ``nn.Module``."""

from __future__ import annotations

import copy

import torch.nn as nn

from .errors import KecompressError
from .split import Split, kels_groups, trace_dependency_graph


def slice_fit(model: nn.Module, split: Split, example_inputs=None) -> nn.Module:
    """Return a new module that holds only the fit hypothesis of a KELS split.

    Every conv, linear and normalisation layer loses its reset channels; channels coupled by
    residual adds, concatenations, depthwise and grouped convolutions or a flatten are cut once
    per coupled group through torch-pruning's dependency graph. ``model`` is left untouched.

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
        KecompressError: a WELS split (sparse, not slim), a split of another model, or a model
            the dependency graph cannot handle.

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
    fit = copy.deepcopy(model)
    graph = trace_dependency_graph(fit, example_inputs)
    for group, kept in kels_groups(graph, split.rate):
        root = group.items[0]
        reset = [channel for channel in range(len(root.idxs)) if channel not in kept]
        if reset:
            graph.get_pruning_group(root.dep.target.module, root.dep.handler, reset).prune(record_history=False)
    return fit
