"""What happens to the network between generations: KE's reset, or what its successors do instead.

A forgetting strategy is any object with one method, ``forget_(model, split, seed=None)``, that
changes the model in place before the next generation trains it, as :func:`kecompress.reset_`
does. Whatever it does, the loop then trains with a new optimizer and the learning-rate schedule
from its start, and measures the fit network of the run's split after every generation.

* :class:`ResetHypothesis` (``--forget ke``, the default): KE's reset.
* :class:`LaterLayers` (``--forget llf``): later-layer forgetting (Zhou et al., ICLR 2022).
* :class:`ShrinkPerturb` (``--forget shrink-perturb``): shrink and perturb (Ash & Adams, NeurIPS 2020).
* :class:`WarmRestart` (``--forget none``): nothing forgotten, the control for the restarts alone.

Every strategy draws its random numbers from ``seed`` alone (the loop passes each generation's
reset seed, :func:`kecompress.seeds.reset_seed`), so a run is reproducible and a resumed run the
same bit for bit. A run records its strategy in its configuration (``RunConfig.forget``, as
:func:`settings_of` gives it), so a run is resumed with the strategy it was started with.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import asdict, dataclass
from typing import ClassVar, Protocol, runtime_checkable

import torch
import torch.nn as nn

from .errors import KecompressError
from .reset import reset_
from .seeds import drawing_from
from .split import Split

_CONVOLUTIONS = nn.modules.conv._ConvNd
_REDRAWN = (_CONVOLUTIONS, nn.Linear)  # the layers KE's reset and LLF re-draw


@runtime_checkable
class Forgetting(Protocol):
    """What the loop asks of a strategy: change ``model`` in place before a generation, drawing
    any random numbers from ``seed``.

    Example:
        >>> class HalveTheLastLayer:
        ...     def forget_(self, model, split, seed=None):
        ...         with torch.no_grad():
        ...             model[-1].weight.mul_(0.5)
        >>> isinstance(HalveTheLastLayer(), Forgetting)
        True
    """

    def forget_(self, model: nn.Module, split: Split, seed: int | None = None) -> object:
        """Change ``model`` in place."""


@dataclass(frozen=True)
class ResetHypothesis:
    """KE's reset (``--forget ke``): the reset hypothesis re-drawn from each layer's own
    initialisation, the fit hypothesis kept bit for bit (:func:`kecompress.reset_`).

    Example:
        >>> import kecompress
        >>> model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> split = kecompress.split(model, "kels", 0.5)
        >>> fit = model[0].weight[:4, :].clone()
        >>> _ = ResetHypothesis().forget_(model, split, seed=1)
        >>> bool(torch.equal(model[0].weight[:4, :], fit))
        True
    """

    name: ClassVar[str] = "ke"

    def forget_(self, model: nn.Module, split: Split, seed: int | None = None) -> nn.Module:
        """Re-draw the reset hypothesis of ``split`` in ``model``; return ``model``."""
        return reset_(model, split, seed=seed)


@dataclass(frozen=True)
class LaterLayers:
    """Later-layer forgetting (``--forget llf``; Zhou, Vani, Larochelle, Courville, "Fortuitous
    Forgetting in Connectionist Networks", ICLR 2022).

    Every conv and linear layer from the module ``start`` on, in definition order, is re-drawn
    from its own initialisation (``reset_parameters``: kaiming-uniform, the draw of their code);
    normalisation layers, and everything before ``start``, are kept bit for bit. The split plays
    no part in what is forgotten.

    Args:
        start: the name of the module to re-draw from, as ``model.named_modules()`` names it
            (``"layer4"``, ``"features.12"``); None: the model's last stage (:func:`default_start`).

    Example:
        >>> import torchvision
        >>> model = torchvision.models.resnet18(num_classes=10)
        >>> LaterLayers().for_model(model)
        LaterLayers(start='layer4')
        >>> kept, redrawn = model.layer3[1].conv2.weight.clone(), model.fc.weight.clone()
        >>> _ = LaterLayers("layer4").forget_(model, split=None, seed=0)
        >>> bool(torch.equal(model.layer3[1].conv2.weight, kept)), bool(torch.equal(model.fc.weight, redrawn))
        (True, False)
    """

    start: str | None = None
    name: ClassVar[str] = "llf"

    def for_model(self, model: nn.Module) -> "LaterLayers":
        """This strategy with its start for ``model``: the default filled in; a name the model
        lacks is refused in one line naming its stages.

        Example:
            >>> LaterLayers("2").for_model(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3)))
            LaterLayers(start='2')
        """
        if self.start is None:
            return LaterLayers(default_start(model))
        if self.start not in {name for name, _ in model.named_modules() if name}:
            raise KecompressError(f"--forget-from {self.start} names no module of this model: pass one of "
                                  f"{', '.join(stages(model))}, or a module inside one (as print(model) names it)")
        return self

    @torch.no_grad()
    def forget_(self, model: nn.Module, split: Split | None = None, seed: int | None = None) -> nn.Module:
        """Re-draw every conv and linear layer of ``model`` from ``start`` on; return ``model``."""
        start = self.for_model(model).start
        reached = False
        with drawing_from(seed, model):
            for name, module in model.named_modules():
                reached = reached or name == start
                if reached and isinstance(module, _REDRAWN):
                    module.reset_parameters()
        return model


@dataclass(frozen=True)
class ShrinkPerturb:
    """Shrink and perturb (``--forget shrink-perturb``; Ash & Adams, "On Warm-Starting Neural
    Network Training", NeurIPS 2020): every parameter, normalisation layers included, becomes
    ``shrink * p + perturb * q``, where ``q`` is a fresh draw of its layer's own initialisation
    (``reset_parameters`` on a copy of the model).

    The defaults are those of their code. (0, 1) is a full re-initialisation, (1, 0) a warm start.
    As in their code, whose network after the step is the freshly drawn one, BatchNorm's running
    statistics start afresh. A parameter whose module has no ``reset_parameters`` (a ConvNeXt
    layer scale, say) has no known initialisation to draw from: it is only shrunk.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
        >>> _ = ShrinkPerturb(shrink=0.5, perturb=0.0).forget_(model, split=None, seed=0)
        >>> model[1].weight.tolist()  # BatchNorm's weight was 1: shrunk, and nothing of a fresh 1 added
        [0.5, 0.5, 0.5, 0.5]
    """

    shrink: float = 0.4
    perturb: float = 0.1
    name: ClassVar[str] = "shrink-perturb"

    def __post_init__(self):
        for setting in ("shrink", "perturb"):
            value = getattr(self, setting)
            if not 0 <= value <= 1:
                raise KecompressError(f"{setting} must be in [0, 1], got {value}: e.g. --{setting} "
                                      f"{getattr(ShrinkPerturb, setting)}")

    @torch.no_grad()
    def forget_(self, model: nn.Module, split: Split | None = None, seed: int | None = None) -> nn.Module:
        """Shrink every parameter of ``model`` and add a fresh draw; return ``model``."""
        fresh = copy.deepcopy(model)
        drawn = set()
        with drawing_from(seed, model):
            for module in fresh.modules():
                own = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
                if own and callable(getattr(module, "reset_parameters", None)):
                    module.reset_parameters()
                    drawn.update(id(param) for param in module.parameters(recurse=False))
        for param, new in zip(model.parameters(), fresh.parameters()):
            param.copy_(self.shrink * param + self.perturb * new if id(new) in drawn else self.shrink * param)
        for buffer, new in zip(model.buffers(), fresh.buffers()):
            buffer.copy_(new)
        return model


@dataclass(frozen=True)
class WarmRestart:
    """Nothing forgotten (``--forget none``): each generation only starts a new optimizer and the
    learning-rate schedule from its start. The control that tells what the restarts do from what
    the forgetting does.

    Example:
        >>> model = nn.Linear(2, 2)
        >>> before = model.weight.clone()
        >>> bool(torch.equal(WarmRestart().forget_(model, split=None, seed=0).weight, before))
        True
    """

    name: ClassVar[str] = "none"

    def forget_(self, model: nn.Module, split: Split | None = None, seed: int | None = None) -> nn.Module:
        """Leave ``model`` as it is; return it."""
        return model


STRATEGIES = {strategy.name: strategy for strategy in (ResetHypothesis, LaterLayers, ShrinkPerturb, WarmRestart)}


def settings_of(strategy: Forgetting) -> dict:
    """How a run records ``strategy`` (``RunConfig.forget``): the name and settings of one of
    kecompress's, the class of one of yours.

    Example:
        >>> settings_of(ShrinkPerturb())
        {'name': 'shrink-perturb', 'shrink': 0.4, 'perturb': 0.1}
    """
    if type(strategy) in STRATEGIES.values():
        return {"name": strategy.name, **asdict(strategy)}
    return {"name": "python", "class": f"{type(strategy).__module__}.{type(strategy).__qualname__}"}


def from_settings(settings: dict) -> Forgetting:
    """The strategy that ``settings`` (as :func:`settings_of` gives them) record.

    Example:
        >>> from_settings({"name": "llf", "start": "layer4"})
        LaterLayers(start='layer4')
    """
    values = dict(settings)
    name = values.pop("name", None)
    if name not in STRATEGIES:
        raise KecompressError(f"unknown forgetting strategy {name!r}: one of {', '.join(STRATEGIES)}, or an object "
                              "of your own with a forget_(model, split, seed=None) method, passed from Python")
    return STRATEGIES[name](**values)


def describe(settings: dict) -> str:
    """Recorded settings in a few words, for titles and messages.

    Example:
        >>> describe({"name": "shrink-perturb", "shrink": 0.4, "perturb": 0.1})
        'shrink-perturb (shrink 0.4, perturb 0.1)'
    """
    details = ", ".join(f"{key} {value}" for key, value in settings.items() if key != "name")
    return settings["name"] + (f" ({details})" if details else "")


def for_model(strategy: Forgetting, model: nn.Module) -> Forgetting:
    """``strategy`` with its settings completed and checked for ``model`` (LLF's start); an
    object without a ``forget_`` method is refused in one line.

    Example:
        >>> import torchvision
        >>> for_model(LaterLayers(), torchvision.models.vgg11_bn())
        LaterLayers(start='features.25')
    """
    if not isinstance(strategy, Forgetting):
        raise KecompressError(f"a forgetting strategy needs a forget_(model, split, seed=None) method, "
                              f"which {type(strategy).__name__} lacks: see kecompress.forgetting")
    return strategy.for_model(model) if isinstance(strategy, LaterLayers) else strategy


def _count(module: nn.Module, kind) -> int:
    return sum(isinstance(inner, kind) for inner in module.modules())


def _last_stage(model: nn.Module) -> tuple[str | None, list[str]]:
    """The last child holding convolutions, walking into a child that holds nine in ten of its
    parent's (a wrapper of the stages: ``features``, ``trunk_output``); and the names of the
    children holding conv or linear layers at every level walked through, for messages."""
    path, names, module = [], [], model
    while True:
        holders = [(name, child) for name, child in module.named_children() if _count(child, _REDRAWN)]
        names += [".".join([*path, name]) for name, _ in holders]
        with_convolutions = [(name, child) for name, child in holders if _count(child, _CONVOLUTIONS)]
        if not with_convolutions:
            return ".".join(path) or None, names
        name, child = with_convolutions[-1]
        path.append(name)
        if 10 * _count(child, _CONVOLUTIONS) < 9 * _count(module, _CONVOLUTIONS):
            return ".".join(path), names
        module = child


def stages(model: nn.Module) -> list[str]:
    """The names LLF's start is chosen among: the model's children holding conv or linear layers
    and, inside a child that wraps the stages (``features``), its children.

    Example:
        >>> import torchvision
        >>> stages(torchvision.models.resnet18())
        ['conv1', 'layer1', 'layer2', 'layer3', 'layer4', 'fc']
    """
    return _last_stage(model)[1]


def default_start(model: nn.Module) -> str:
    """LLF's default start: the model's last stage, the last child that holds convolutions,
    inside ``features`` (or any child that holds nine in ten of the model's convolutions) when
    there is one. A model with no stage after its first convolution is refused in one line asking
    for ``--forget-from``.

    Example:
        >>> import torchvision
        >>> default_start(torchvision.models.resnet18()), default_start(torchvision.models.mobilenet_v2())
        ('layer4', 'features.18')
    """
    start, names = _last_stage(model)
    before = itertools.takewhile(lambda item: item[0] != start, model.named_modules())
    if start is None or not any(isinstance(module, _CONVOLUTIONS) for _, module in before):
        raise KecompressError("this model has no stage after its first convolution to start later-layer forgetting "
                              f"from: pass --forget-from with the module to re-draw from, one of {', '.join(names)}")
    return start
