"""What a run is: its training hyper-parameters and the configuration that makes it one run.

:class:`TrainingConfig` holds the hyper-parameters of every generation. :class:`RunConfig` holds
everything that decides what a run computes (model, data, split, loss, training, processes): it
is written to ``config.json`` by the command line and the Python API alike, and
:meth:`RunConfig.check_same_run` is the one check that a resumed run is the run it continues.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from .errors import KecompressError
from .models import is_model_file

# What the fit network's BatchNorm layers use: statistics re-estimated for the fit network on the
# training data, or those the dense network gathered (KE's definition of the fit, as cut out).
FIT_BATCHNORM = ("re-estimated", "inherited")


@dataclass
class TrainingConfig:
    """Hyper-parameters of every generation (each generation uses the same ones).

    Example:
        >>> TrainingConfig(generations=3, epochs=2).lr
        0.1
    """

    generations: int = 5
    epochs: int = 10
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_epochs: int = 0
    seed: int = 0
    target: float | None = None  # a fit-hypothesis metric at which the run stops early

    def __post_init__(self):
        for name in ("generations", "epochs"):
            if int(getattr(self, name)) < 1:
                raise KecompressError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise KecompressError(f"learning rate must be a positive number, got {self.lr}: e.g. --lr 0.1")
        if self.weight_decay < 0:
            raise KecompressError(f"weight decay must be 0 or more, got {self.weight_decay}")
        if not 0 <= self.warmup_epochs < self.epochs:
            raise KecompressError(
                f"warm-up epochs must be in [0, epochs), got {self.warmup_epochs} with {self.epochs} epochs")

    def identity(self) -> dict:
        """The settings that make two runs the same run: all but the early-stopping target.

        Example:
            >>> "target" in TrainingConfig().identity()
            False
        """
        return {key: value for key, value in asdict(self).items() if key != "target"}


@dataclass
class RunConfig:
    """The configuration of one run, as ``config.json`` holds it.

    Fields a run made from Python cannot know (the data of the user's own loaders, say) are None.
    Devices, precision, channels-last, compilation and the early-stopping target are not part
    of it: they may change when a run is resumed.

    Example:
        >>> config = RunConfig(model="resnet18", num_classes=10, training=TrainingConfig(epochs=2))
        >>> config.arch, RunConfig.from_json(config.to_json()) == config
        ('resnet18', True)
    """

    model: str | None = None  # an architecture name (torchvision's, or timm:NAME) or a model file; None: from Python
    num_classes: int | None = None
    weights: str | None = None  # a state dict loaded into the model before the split; None: random init
    classes: list[str] | None = None
    split: str = "kels"
    rate: float = 0.5
    align: int = 1  # KELS: every coupled group keeps a multiple of this many channels
    grouped: str = "whole-groups"  # KELS: a grouped conv keeps whole groups, or narrows every group (kecompress.split)
    seed: int = 0  # of the split, the data order and the resets
    data: str | None = None  # an ImageFolder directory; None: the bundled digits, or loaders from Python
    image_size: int | None = None
    val_fraction: float | None = 0.2
    augment: str | None = None  # an image folder's augmentation (kecompress.augment); None: the demo's, none
    crop_scale: list[float] | None = None  # the resized crop's share of the image's area, [min, max]
    workers: int = 0  # data loading processes: their random numbers are not the main process's
    batch_size: int | None = 32
    label_smoothing: float | None = 0.1
    fit_batchnorm: str = "re-estimated"
    forget: dict = field(default_factory=lambda: {"name": "ke"})  # between generations (kecompress.forgetting)
    metric: str = "accuracy"
    training: TrainingConfig = field(default_factory=TrainingConfig)
    distill_fit: dict | None = None  # FitDistillation's settings; None: no in-place distillation
    finetune_fit: dict | None = None  # FitFinetuning's settings; None: no fine-tuning of the fit
    fit_only: bool = False  # train the fit-sized network from scratch (kecompress.slim.fit_sized), no generations of KE
    select: str = "first"  # KELS: which channels the fit keeps (kecompress.shape): first, magnitude, bn-scale, taylor
    select_after: int = 1  # KE: the generation after which the fit is chosen by importance (a --weights start: before 1)
    widths: str = "uniform"  # KELS: how many channels each group keeps: uniform (--rate) or global (--fit-macs)
    fit_macs: float | None = None  # widths global: the fit's share of the dense MACs; None: the uniform fit's
    sparsity: float = 0.0  # network slimming's L1 penalty on BatchNorm scales while the shape is learned
    shape_epochs: int = 0  # fit-only with a learned shape: epochs of the dense network that learn it
    shape_from: str | None = None  # fit-only: the run directory whose fit's shape is trained from scratch
    distill_from_run: str | None = None  # fit-only: the run directory whose dense network teaches
    world_size: int = 1
    trust_model_file: bool = False
    loaders: str = "kecompress"  # "kecompress": data and loss built from this config; "python": the user's own

    # Settings that may differ between a run and its resumed continuation.
    _NOT_IDENTITY = ("trust_model_file",)
    # Values of settings a run directory written before the setting existed had.
    _LEGACY = {"world_size": 1, "fit_batchnorm": "inherited", "metric": "accuracy", "loaders": "kecompress", "workers": 0,
               "forget": {"name": "ke"}, "align": 1, "fit_only": False, "select": "first", "select_after": 1,
               "widths": "uniform", "fit_macs": None, "sparsity": 0.0, "shape_epochs": 0, "shape_from": None,
               "distill_from_run": None, "grouped": "narrow"}

    @property
    def arch(self) -> str | None:
        """The architecture name (torchvision's, or timm:NAME); None for a model from a file or from Python."""
        return self.model if self.model and not is_model_file(self.model) else None

    def to_json(self) -> dict:
        """The ``config.json`` form (with ``arch`` beside ``model``, as earlier versions wrote)."""
        values = asdict(self)
        values["training"] = self.training.identity()
        values["arch"] = self.arch
        return values

    @classmethod
    def from_json(cls, values: dict) -> "RunConfig":
        """Read ``config.json``; settings it lacks take the value runs had before they existed."""
        known = {item.name for item in fields(cls)}
        if values.get("data") and "augment" not in values:  # image folders were augmented one way
            values = {**values, "augment": "resized-crop", "crop_scale": [0.08, 1.0]}
        values = {**cls._LEGACY, **{key: value for key, value in values.items() if key in known}}
        values["training"] = TrainingConfig(**values.get("training", {}))
        return cls(**values)

    def identity(self) -> dict:
        """The settings that make two runs the same run.

        Example:
            >>> RunConfig(rate=0.5).identity() == RunConfig(rate=0.25).identity()
            False
        """
        values = {key: value for key, value in asdict(self).items() if key not in self._NOT_IDENTITY}
        values["training"] = self.training.identity()
        return values

    def check_same_run(self, saved: "RunConfig", where: str | Path) -> None:
        """Refuse to continue the run saved in ``where`` with this configuration unless they are
        the same run: one line naming what differs (the number of processes has its own).

        Example:
            >>> RunConfig(rate=0.5).check_same_run(RunConfig(rate=0.25), "runs/a")
            Traceback (most recent call last):
            ...
            kecompress.errors.KecompressError: runs/a holds a different run (it differs in rate): resume with the same settings, or choose another --out
        """
        if saved.loaders == "python" and self.loaders != "python":
            raise KecompressError(f"{where} was made from Python with data loaders of its own, which the command "
                                  "line cannot rebuild: resume it from Python, with Evolution(..., run_dir=...).resume()")
        mine, theirs = self.identity(), saved.identity()
        changed = [key for key in mine if mine[key] != theirs[key]]
        if "training" in changed:
            changed.remove("training")
            changed += sorted(key for key in mine["training"] if mine["training"][key] != theirs["training"][key])
        if changed == ["world_size"]:
            was, now = saved.world_size, self.world_size
            raise KecompressError(
                f"{where} was trained by {processes(was)} and this run has {processes(now)}: the images of a "
                "step (batch size x processes) and the steps of an epoch would change, a different run; resume "
                + (f"with torchrun --nproc_per_node {was}" if was > 1 else "in one process (no torchrun)")
                + " (processes of all machines together), or choose another --out")
        if changed:
            raise KecompressError(f"{where} holds a different run (it differs in {', '.join(changed)}): "
                                  "resume with the same settings, or choose another --out")


def processes(count: int) -> str:
    """``"1 process"``, ``"2 processes"``.

    Example:
        >>> processes(2)
        '2 processes'
    """
    return f"{count} process" + ("es" if count != 1 else "")
