"""What a split does before any training: kept channels per layer, the coupled channel groups,
parameters and MACs of the dense and the fit network, and for a run its configuration and last
generation (``kecompress info``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
from rich.console import Group
from rich.table import Table
from rich.text import Text

from .bench import count_macs_params
from .slim import slice_fit
from .split import SPLITTABLE_LAYERS, Split, has_grouped_convs, split as make_split, trace_dependency_graph


@dataclass(frozen=True)
class LayerSplit:
    """One layer's weight: its (output, input) channels dense, and how many of each the fit keeps
    (KELS), or the fraction of its entries the fit keeps (WELS)."""

    name: str
    kind: str
    dense: tuple[int, ...]
    fit: tuple[int, ...]
    kept: float


@dataclass(frozen=True)
class SplitInfo:
    """The split of one model at one input size.

    Example:
        >>> import kecompress
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
        >>> _ = model(torch.zeros(1, 3, 6, 6))
        >>> split = kecompress.split(model, "kels", 0.5, example_inputs=torch.zeros(1, 3, 6, 6))
        >>> info = split_info(model, split, (3, 6, 6))
        >>> [layer.fit for layer in info.layers]
        [(4, 3), (4,), (2, 64)]
    """

    method: str
    rate: float
    input_shape: tuple[int, ...]
    coupled_groups: int
    layers: list[LayerSplit]
    dense_parameters: int
    fit_parameters: int
    fit_fraction: float
    dense_macs: int
    fit_macs: int | None  # None for WELS: a sparse network runs at the dense network's cost
    run: dict = field(default_factory=dict)  # a run directory's configuration and last generation
    align: int = 1  # every coupled group keeps a multiple of this many channels
    select: str = "first"  # which channels: first, or by importance (kecompress.shape)
    widths: str = "uniform"  # how many per group: uniform, or global to a MAC budget
    uniform_fit_macs: int | None = None  # a learned split: the paper's uniform fit's MACs at the same rate and align
    grouped: str | None = "whole-groups"  # a grouped convolution keeps whole groups, or narrows every group; None: none

    def to_json(self) -> dict:
        values = asdict(self)
        values["rate_squared"] = self.rate ** 2
        return values


def split_info(model: nn.Module, split: Split, input_shape: tuple[int, ...], run: dict | None = None) -> SplitInfo:
    """What ``split`` does to ``model`` on inputs of ``input_shape`` (one sample, no batch);
    ``run`` adds what a run directory says of itself.

    Example:
        >>> import kecompress
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> split_info(model, kecompress.split(model, "kels", 0.5), (4,)).fit_parameters  # 4x4 + 4, 2x4 + 2
        30
    """
    example = torch.zeros(1, *input_shape)
    layers = [_layer_split(name, module, split.masks[f"{name}.weight"], split.method)
              for name, module in model.named_modules()
              if isinstance(module, SPLITTABLE_LAYERS) and f"{name}.weight" in split.masks]
    dense_macs, dense_parameters = count_macs_params(model, input_shape)
    groups = 0
    fit_macs = None
    if split.method == "kels":
        graph = trace_dependency_graph(model, example)
        groups = sum(1 for _ in graph.get_all_groups(root_module_types=(nn.modules.conv._ConvNd, nn.Linear)))
        fit_macs, _ = count_macs_params(slice_fit(model, split, example_inputs=example), input_shape)
    uniform_macs = None
    if (split.select, split.widths) != ("first", "uniform"):  # beside it, the paper's fit of the same rate
        uniform = make_split(model, "kels", split.rate, example_inputs=example, align=split.align)
        uniform_macs, _ = count_macs_params(slice_fit(model, uniform, example_inputs=example), input_shape)
    return SplitInfo(split.method, split.rate, tuple(input_shape), groups, layers, dense_parameters,
                     split.fit_parameters(model), split.fit_fraction(), dense_macs, fit_macs, run or {}, split.align,
                     split.select, split.widths, uniform_macs, split.grouped if has_grouped_convs(model) else None)


def _layer_split(name: str, module: nn.Module, mask: torch.Tensor, method: str) -> LayerSplit:
    dense = tuple(mask.shape[:2])
    if method == "kels":
        rows = mask.reshape(mask.shape[0], -1)
        fit = (int(rows.any(dim=1).sum()),)
        if mask.dim() > 1:
            fit += (int(mask.reshape(mask.shape[0], mask.shape[1], -1).any(dim=2).any(dim=0).sum()),)
    else:
        fit = dense
    return LayerSplit(name, type(module).__name__, dense, fit, float(mask.float().mean()))


def info_view(info: SplitInfo, title: str):
    """The rich rendering of :class:`SplitInfo`: a table of layers, then the totals (and the run).

    Example:
        >>> info = SplitInfo("kels", 0.5, (3, 8, 8), 1, [LayerSplit("0", "Conv2d", (8, 3), (4, 3), 0.5)],
        ...                  100, 30, 0.3, 1000, 260)
        >>> info_view(info, "demo").renderables[1].row_count
        1
    """
    table = Table(box=None, pad_edge=False)
    for header in ("layer", "type", "dense out, in", "fit out, in", "kept"):
        table.add_column(header, justify="left" if header in ("layer", "type") else "right")
    for layer in info.layers:
        table.add_row(layer.name, layer.kind, ", ".join(map(str, layer.dense)), ", ".join(map(str, layer.fit)),
                      f"{layer.kept:.1%}")
    aligned = f" aligned to {info.align} channels" if info.align > 1 else ""
    lines = [f"{info.method.upper()} rate {info.rate}{aligned} on inputs {tuple(info.input_shape)}: fit {info.fit_fraction:.1%} "
             f"of the split's parameters (rate² = {info.rate ** 2:.1%})",
             f"parameters: dense {info.dense_parameters:,}, fit {info.fit_parameters:,} "
             f"({info.fit_parameters / info.dense_parameters:.1%})"]
    if info.method == "kels" and info.grouped:
        lines += [f"grouped convolutions: {info.grouped} ("
                  + ("a rate share of the groups, each at full width)" if info.grouped == "whole-groups"
                     else "every group, each narrowed to a rate share of its width)")]
    if info.fit_macs is not None:
        lines += [f"MACs: dense {info.dense_macs:,}, fit {info.fit_macs:,} ({info.dense_macs / info.fit_macs:.2f}x fewer); "
                  f"{info.coupled_groups} coupled channel groups cut once each (the logits' stay whole)"]
        if info.uniform_fit_macs is not None:
            lines += [f"channels chosen by {info.select}, {info.widths} widths: fit {info.fit_macs / info.dense_macs:.1%} "
                      f"of the dense MACs; the uniform fit at rate {info.rate}: {info.uniform_fit_macs:,} "
                      f"({info.uniform_fit_macs / info.dense_macs:.1%})"]
    else:
        lines += [f"MACs: {info.dense_macs:,} dense and fit alike (a WELS fit is sparse, not slim)"]
    for key, value in info.run.items():
        lines.append(f"{key}: {value}")
    return Group(Text(title, style="bold"), table, *map(Text, lines))
