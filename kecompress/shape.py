"""A learned KELS fit: which channels every coupled group keeps, chosen by importance, and how
many, by one global ranking to a MAC budget.

KE's paper keeps the first ``ceil(rate*C)`` channels of every layer: a predefined architecture.
Here a KELS split can instead keep, in every coupled group of torch-pruning's dependency graph,

* its most important channels (``select``): ``"magnitude"`` (torch-pruning's group L2 norm of
  every weight the channel touches), ``"bn-scale"`` (the absolute BatchNorm scale, as network
  slimming ranks channels; a group without BatchNorm falls back to magnitude) or ``"taylor"``
  (first-order Taylor: weight times gradient, the gradient of the loss on a few training batches);
* as many as one ranking across all groups gives (``widths="global"``): every group's importance
  divided by its mean (torch-pruning's ``normalizer="mean"``, as its global pruning does), one
  threshold for all, bisected until the fit's MACs are ``fit_macs`` of the dense network's (within
  2%). A group keeps at least ``align`` channels (a multiple of it), so no layer, and no residual
  stage (its channels are one group through the additions), is ever cut away whole.

The result is an ordinary KELS :class:`~kecompress.Split`: slicing, export, INT8, ``info`` and
resume follow its masks.
"""

from __future__ import annotations

import itertools
import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn as nn
import torch_pruning as tp

from .attention import qkv_heads
from .bench import count_macs_params
from .errors import KecompressError
from .slim import slice_fit_shape
from .split import (Split, _channel_blocks, _is_depthwise, check_align, check_rate, default_example_inputs,
                    kels_groups, masks_of_groups, split as make_split, trace_dependency_graph)

SELECTIONS = ("first", "magnitude", "bn-scale", "taylor")
WIDTHS = ("uniform", "global")
MAC_TOLERANCE = 0.02  # the fit's MACs are within 2% of the budget


def check_fit_macs(fit_macs) -> float:
    """Return ``fit_macs`` as a float, or raise a KecompressError unless it is in (0, 1).

    Example:
        >>> check_fit_macs("0.3")
        0.3
    """
    try:
        value = float(fit_macs)
    except (TypeError, ValueError):
        value = math.nan
    if not 0.0 < value < 1.0:
        raise KecompressError(f"--fit-macs is the fit's share of the dense network's MACs and must be in (0, 1), "
                              f"got {fit_macs!r}: e.g. 0.25")
    return value


def check_choice(select: str, widths: str) -> None:
    """Refuse an unknown selection or width rule, in one line.

    Example:
        >>> check_choice("bn-scale", "global")
    """
    if select not in SELECTIONS:
        raise KecompressError(f"unknown selection {select!r}: use one of {', '.join(SELECTIONS)}")
    if widths not in WIDTHS:
        raise KecompressError(f"unknown widths {widths!r}: use uniform or global")


def learned_split(model: nn.Module, rate: float = 0.5, *, select: str = "magnitude", widths: str = "uniform",
                  fit_macs: float | None = None, align: int = 1, example_inputs=None,
                  batches: Iterable | None = None, loss_fn: Callable | None = None) -> Split:
    """A KELS split of ``model`` whose fit keeps the channels ``select`` ranks most important, as
    many per group as ``widths`` says.

    Args:
        model: the dense network, as trained so far; not modified (``"taylor"`` leaves ``.grad`` as it was).
        rate: ``widths="uniform"``: every group keeps ``ceil(rate*C)`` channels, as KE's rule does;
            ``"global"``: the uniform split at ``rate`` gives the default budget.
        select: ``"first"``, ``"magnitude"``, ``"bn-scale"`` or ``"taylor"``.
        widths: ``"uniform"`` or ``"global"``.
        fit_macs: ``"global"``: the fit's share of the dense network's MACs, in (0, 1); by default
            the uniform fit's at ``rate`` and ``align``.
        align: every group keeps a multiple of ``align`` channels, at least ``align``.
        example_inputs: an input the model accepts (default: as in :func:`~kecompress.split`).
        batches: ``"taylor"``: ``(inputs, targets)`` batches whose loss gives the gradients.
        loss_fn: ``"taylor"``: the loss (cross-entropy by default).

    Raises:
        KecompressError: an unknown selection or width rule, a ``fit_macs`` outside (0, 1), a
            budget no shape meets at this ``align``, ``"taylor"`` without batches.

    Example:
        >>> import torchvision
        >>> model = torchvision.models.resnet18(num_classes=10)
        >>> s = learned_split(model, 0.5, select="bn-scale", widths="global", fit_macs=0.3,
        ...                   example_inputs=torch.randn(1, 3, 32, 32))
        >>> s.select, s.widths, s.fit_macs
        ('bn-scale', 'global', 0.3)
    """
    check_choice(select, widths)
    rate, align = check_rate(rate), check_align(align)
    if fit_macs is not None:
        fit_macs = check_fit_macs(fit_macs)
        if widths != "global":
            raise KecompressError("--fit-macs sets the budget of --widths global; uniform widths follow --rate: "
                                  "drop --fit-macs or pass --widths global")
    if example_inputs is None:
        example_inputs = default_example_inputs(model)
    if select == "first" and widths == "uniform":
        return make_split(model, "kels", rate, example_inputs=example_inputs, align=align)
    graph = trace_dependency_graph(model, example_inputs)
    qkv_blocks = qkv_heads(model)
    groups = [_Group(graph, group, uniform, align, qkv_blocks) for group, uniform in
              kels_groups(graph, rate, align, "narrow")]
    with _gradients(model, select, batches, loss_fn):
        for group in groups:
            group.score(select)
    if widths == "uniform":
        kept = [(group.group, group.keep_per_block(len(group.uniform) // group.blocks)) for group in groups]
        return Split("kels", rate, masks=masks_of_groups(model, graph, kept), align=align, select=select,
                     grouped="narrow")
    dense_macs = count_macs_params(model, tuple(example_inputs.shape[1:]))[0]
    if fit_macs is None:
        uniform = masks_of_groups(model, graph, [(group.group, group.uniform) for group in groups])
        fit_macs = _macs_share(model, Split("kels", rate, masks=uniform, align=align), example_inputs, dense_macs)
    masks = _global_masks(model, graph, groups, fit_macs, dense_macs, align, example_inputs, rate)
    return Split("kels", rate, masks=masks, align=align, select=select, widths="global", fit_macs=fit_macs,
                 grouped="narrow")


class _Group:
    """One coupled group: its channels in equal blocks (a grouped convolution's), the paper's fit of
    it (``uniform``), and its channels' importance, normalised by their mean."""

    def __init__(self, graph: tp.DependencyGraph, group, uniform: set[int], align: int, qkv_blocks: dict):
        self.group, self.uniform = group, uniform
        self.channels = len(group.items[0].idxs)
        self.blocks = _channel_blocks(graph, group, self.channels, qkv_blocks)
        self.size = self.channels // self.blocks
        self.step = align // math.gcd(align, self.blocks)  # per block, as fit_channels rounds
        self.scores = torch.zeros(self.channels)

    def score(self, select: str) -> None:
        if select == "first":  # the paper's order, as a ranking: earlier channels first
            scores = self.size - torch.arange(self.channels, dtype=torch.float32) % self.size
        else:
            scores = _IMPORTANCE[select](self.group)
            if scores is None:  # bn-scale on a group without BatchNorm
                scores = _IMPORTANCE["magnitude"](self.group)
        self.scores = scores.detach().float().cpu() / max(float(scores.mean()), 1e-12)

    def keep_per_block(self, keep: int) -> set[int]:
        """The ``keep`` most important channels of every block (ties: the earlier channel)."""
        keep = min(self.size, max(keep, self.step))
        kept = set()
        for block in range(self.blocks):
            scores = self.scores[block * self.size:(block + 1) * self.size]
            order = sorted(range(self.size), key=lambda channel: (-float(scores[channel]), channel))
            kept.update(block * self.size + channel for channel in order[:keep])
        return kept

    def count_at(self, ranks: torch.Tensor, top: int) -> int:
        """Channels per block kept when the ``top`` channels of the global ranking are: those of this
        group among them (``ranks``: each of its channels' place), rounded up to the step."""
        return self.per_block(int((ranks < top).sum()))

    def per_block(self, chosen: int) -> int:
        """Channels per block when ``chosen`` of the group's are: rounded up to the step, at least one step."""
        per_block = -(-chosen // self.blocks)
        return min(self.size, max(self.step, -(-per_block // self.step) * self.step))


def _global_masks(model, graph, groups: list[_Group], fit_macs: float, dense_macs: int, align: int,
                  example_inputs, rate: float) -> dict[str, torch.Tensor]:
    """Masks at the global threshold whose fit costs ``fit_macs`` of the dense MACs: bisected on a
    fast estimate (each conv and linear layer's MACs scale with its kept output and input
    channels), then checked by cutting the fit out and counting; the estimate's target is
    corrected by what the count found, a few times at most."""
    estimate = _MacEstimate(model, graph, groups, example_inputs)
    ranks = _global_ranks(groups)
    target, best = fit_macs * estimate.dense, None
    for _ in range(4):
        counts = _fill(groups, ranks, estimate, target)
        masks = masks_of_groups(model, graph, [(group.group, group.keep_per_block(count))
                                               for group, count in zip(groups, counts)])
        share = _macs_share(model, Split("kels", rate, masks=masks, align=align), example_inputs, dense_macs)
        if best is None or abs(share - fit_macs) < abs(best[0] - fit_macs):
            best = (share, masks)
        if abs(share - fit_macs) <= MAC_TOLERANCE * fit_macs:
            return masks
        if all(count == group.count_at(rank, 0) for count, group, rank in zip(counts, groups, ranks)) \
                and share > fit_macs:
            raise KecompressError(
                f"no shape meets --fit-macs {fit_macs:g} at --align {align}: the narrowest, every coupled group at "
                f"{align} channel(s), still costs {share:.3f} of the dense MACs; raise --fit-macs or lower --align")
        target *= fit_macs / share
    raise KecompressError(
        f"no shape meets --fit-macs {fit_macs:g} within {MAC_TOLERANCE:.0%} at --align {align}: the nearest costs "
        f"{best[0]:.3f} of the dense MACs (the groups' channel steps are too coarse); lower --align or change --fit-macs")


def _fill(groups: list[_Group], ranks: list[torch.Tensor], estimate: "_MacEstimate", target: float) -> list[int]:
    """Channels per block of every group: the global ranking's top channels, as many as the budget
    ``target`` (estimated MACs) allows. Bisected on how many of the ranking are kept, then filled
    further down the ranking: a group whose next step would overshoot stops there, the others go on
    (a wide residual group's step of ``align`` channels can be several per cent of the MACs)."""
    def counts_of(top: int) -> list[int]:
        return [group.count_at(rank, top) for group, rank in zip(groups, ranks)]

    low, high = 0, sum(group.channels for group in groups)
    while low < high:
        middle = (low + high + 1) // 2
        if estimate.macs(counts_of(middle)) > target:
            high = middle - 1
        else:
            low = middle
    counts = counts_of(low)
    owner = torch.cat([torch.full((group.channels,), index) for index, group in enumerate(groups)])
    order = torch.cat(ranks).argsort()
    seen = torch.tensor([int((rank < low).sum()) for rank in ranks])
    stopped, macs = set(), estimate.macs(counts)
    for channel in order[low:].tolist():
        index = int(owner[channel])
        if index in stopped:
            continue
        seen[index] += 1
        group = groups[index]
        wanted = group.per_block(int(seen[index]))
        if wanted <= counts[index]:
            continue
        grown = estimate.macs_with(counts, index, wanted, macs)
        if grown > target:
            stopped.add(index)
            continue
        counts[index], macs = wanted, grown
    return counts


def _global_ranks(groups: list[_Group]) -> list[torch.Tensor]:
    """Every channel's place in one ranking of all groups' channels by normalised importance;
    ties (equal BatchNorm scales at initialisation, say) go to the channel earlier in its block,
    relative to the block's size (the paper's order), so that a tie everywhere gives near-uniform widths."""
    scores = torch.cat([group.scores for group in groups])
    position = torch.cat([(torch.arange(group.channels) % group.size).float() / group.size for group in groups])
    order = sorted(range(len(scores)), key=lambda index: (-float(scores[index]), float(position[index])))
    places = torch.empty(len(scores), dtype=torch.long)
    places[torch.tensor(order, dtype=torch.long)] = torch.arange(len(scores))
    return list(places.split([group.channels for group in groups]))


class _MacEstimate:
    """The MACs of the conv and linear layers of a fit whose groups keep given channel counts per
    block: each layer's dense MACs (measured once on the example input) times its kept share of
    output channels and, except depthwise convolutions, of input channels."""

    def __init__(self, model, graph, groups: list[_Group], example_inputs):
        layer_macs = _layer_macs(model, example_inputs)
        self.dense = sum(layer_macs.values())
        self.layers = layer_macs
        # Which group holds each layer's output and input channels: (group index, side).
        self.sides: dict[nn.Module, dict[str, int]] = {}
        for index, group in enumerate(groups):
            for item in group.group.items:
                module = item.dep.target.module
                if module in layer_macs:
                    side = "out" if graph.is_out_channel_pruning_fn(item.dep.handler) else "in"
                    self.sides.setdefault(module, {})[side] = index
        self.groups = groups
        self.touches: dict[int, set] = {}
        for module, sides in self.sides.items():
            for index in sides.values():
                self.touches.setdefault(index, set()).add(module)

    def macs_with(self, counts: list[int], index: int, count: int, macs: float) -> float:
        """``macs`` (the estimate at ``counts``) with group ``index`` keeping ``count`` per block."""
        old, new = counts[index] / self.groups[index].size, count / self.groups[index].size
        for module in self.touches.get(index, ()):
            sides = self.sides[module]
            before = self._layer(module, sides, counts, index, old)
            after = self._layer(module, sides, counts, index, new)
            macs += after - before
        return macs

    def _layer(self, module, sides, counts, index, share) -> float:
        def side_share(side):
            if side not in sides:
                return 1.0
            other = sides[side]
            return share if other == index else counts[other] / self.groups[other].size
        in_share = 1.0 if _is_depthwise(module) else side_share("in")
        return self.layers[module] * side_share("out") * in_share

    def macs(self, counts: list[int]) -> float:
        shares = [count / group.size for count, group in zip(counts, self.groups)]
        total = 0.0
        for module, macs in self.layers.items():
            sides = self.sides.get(module, {})
            out_share = shares[sides["out"]] if "out" in sides else 1.0
            in_share = shares[sides["in"]] if "in" in sides else 1.0
            total += macs * out_share * (1.0 if _is_depthwise(module) else in_share)
        return total


def _layer_macs(model: nn.Module, example_inputs) -> dict[nn.Module, int]:
    """Every conv and linear layer's MACs on one example input, from its output's size."""
    macs, hooks = {}, []

    def record(module, _inputs, output):
        per_output = module.weight[0].numel() if isinstance(module, nn.modules.conv._ConvNd) else module.in_features
        macs[module] = macs.get(module, 0) + output.numel() // output.shape[0] * per_output

    for module in model.modules():
        if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
            hooks.append(module.register_forward_hook(record))
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(example_inputs[:1])
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    return macs


def _macs_share(model, split: Split, example_inputs, dense_macs: int) -> float:
    # the MACs of the fit slice_fit cuts, counted exactly on its weightless shape: choosing a shape
    # counts twice (the uniform budget, the final check), and copying and checking weights cost most
    fit = slice_fit_shape(model, split, example_inputs=example_inputs)
    return count_macs_params(fit, tuple(example_inputs.shape[1:]))[0] / dense_macs


_IMPORTANCE = {
    "magnitude": tp.importance.GroupMagnitudeImportance(p=2, normalizer=None),
    "bn-scale": tp.importance.BNScaleImportance(normalizer=None),
    "taylor": tp.importance.GroupTaylorImportance(normalizer=None),
}


def _gradients(model, select: str, batches, loss_fn):
    """For ``"taylor"``: the loss's gradients on ``batches`` in every parameter's ``.grad`` while
    the groups are scored, the previous ``.grad`` put back afterwards."""
    if select != "taylor":
        return nullcontext()
    if batches is None:
        raise KecompressError("the taylor selection needs training batches for its gradients: pass batches "
                              "(the command line uses the run's training data)")
    return _TaylorGradients(model, batches, loss_fn or nn.CrossEntropyLoss())


class _TaylorGradients:
    def __init__(self, model, batches, loss_fn):
        self.model, self.batches, self.loss_fn = model, batches, loss_fn

    def __enter__(self):
        params = list(self.model.parameters())
        self.saved = [param.grad for param in params]
        for param in params:
            param.grad = None
        was_training = self.model.training
        self.model.eval()  # the statistics stay as trained; the gradients are the loss's on these images
        try:
            with torch.enable_grad():
                for inputs, targets in self.batches:
                    self.loss_fn(self.model(inputs), targets).backward()
        finally:
            self.model.train(was_training)

    def __exit__(self, *_):
        for param, grad in zip(self.model.parameters(), self.saved):
            param.grad = grad


@dataclass(frozen=True)
class Selection:
    """When and how a run chooses its fit by importance (``--select``, ``--widths``,
    ``--fit-macs``, ``--select-after``, ``--sparsity``): after generation ``after`` of KE (0:
    before the first, from pretrained weights) the split is made anew by :func:`learned_split`
    on the dense network, then fixed; until then BatchNorm scales carry network slimming's L1
    penalty of strength ``sparsity``.

    Example:
        >>> Selection("bn-scale", "global").learned
        True
    """

    select: str = "first"
    widths: str = "uniform"
    fit_macs: float | None = None
    after: int = 1
    sparsity: float = 0.0

    def __post_init__(self):
        check_choice(self.select, self.widths)
        if self.fit_macs is not None:
            check_fit_macs(self.fit_macs)
            if self.widths != "global":
                raise KecompressError("--fit-macs sets the budget of --widths global; uniform widths follow --rate: "
                                      "drop --fit-macs or pass --widths global")
        if self.after < 0:
            raise KecompressError(f"--select-after must be a generation, 1 or more, got {self.after}")
        if not self.sparsity >= 0:
            raise KecompressError(f"--sparsity must be 0 or more, got {self.sparsity}: e.g. 1e-4")

    @property
    def learned(self) -> bool:
        """Whether the fit is anything but the paper's first channels at uniform widths."""
        return (self.select, self.widths) != ("first", "uniform")

    def made(self, split: Split) -> bool:
        """Whether ``split`` is already the one this selection chooses.

        Example:
            >>> Selection("magnitude").made(Split("kels", 0.5))
            False
        """
        return (split.select, split.widths) == (self.select, self.widths)

    def choose(self, model: nn.Module, split: Split, example_inputs, train_data=None, loss_fn=None) -> Split:
        """The split chosen on ``model`` as it is now, at ``split``'s rate and align. ``"taylor"``
        takes its gradients from the first ``TAYLOR_BATCHES`` batches of ``train_data`` (a data
        loader, read in order, unshuffled; or any iterable of batches), the random state left as it was.

        Example:
            >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
            >>> Selection("magnitude").choose(model, Split("kels", 0.5, seed=3), torch.zeros(1, 4)).seed
            3
        """
        batches = None
        if self.select == "taylor":
            if train_data is None:
                raise KecompressError("the taylor selection needs training data for its gradients")
            device = example_inputs.device
            with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
                if isinstance(train_data, torch.utils.data.DataLoader):
                    train_data = torch.utils.data.DataLoader(train_data.dataset, batch_size=train_data.batch_size)
                batches = [(inputs.to(device), targets.to(device))
                           for inputs, targets in itertools.islice(train_data, TAYLOR_BATCHES)]
        chosen = learned_split(model, split.rate, select=self.select, widths=self.widths, fit_macs=self.fit_macs,
                               align=split.align, example_inputs=example_inputs, batches=batches, loss_fn=loss_fn)
        chosen.seed = split.seed
        return chosen


TAYLOR_BATCHES = 4  # of the training data, in order: the taylor selection's gradients


class SlimmingLoss:
    """``loss_fn`` plus network slimming's penalty: ``strength`` times the sum of the absolute
    BatchNorm scales of ``model`` (Liu et al., ICCV 2017), which drives the scales of unneeded
    channels towards zero so that ``bn-scale`` ranks them last.

    Example:
        >>> model = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))
        >>> loss = SlimmingLoss(lambda outputs, targets: torch.tensor(0.0), model, 0.1)
        >>> round(float(loss(None, None).detach()), 4)  # 0.1 x (1 + 1 + 1)
        0.3
    """

    def __init__(self, loss_fn: Callable, model: nn.Module, strength: float):
        self.loss_fn, self.strength = loss_fn, strength
        self.scales = [module.weight for module in model.modules()
                       if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.weight is not None]

    def __call__(self, outputs, targets):
        penalty = sum(scale.abs().sum() for scale in self.scales)
        return self.loss_fn(outputs, targets) + self.strength * penalty
