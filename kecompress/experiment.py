"""The one set-up path: a run's model, data, split, loss and loop, built from its configuration.

The command line's ``evolve`` and the benchmarks build every run through :func:`build`, so that
what a configuration means is written once. Under torchrun every rank calls it: rank 0 alone
reads and writes the run directory and sends the split to the others.

Example:
    >>> import kecompress
    >>> from kecompress.config import RunConfig, TrainingConfig
    >>> config = RunConfig(model="resnet18", rate=0.5, batch_size=64, training=TrainingConfig(generations=1, epochs=1))
    >>> loop = build(config)
    >>> loop.split.method, loop.run_config.num_classes
    ('kels', 10)
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Sequence

import torch
from torch.utils.data import Dataset

from . import data as datasets
from . import distributed
from .acceleration import check_channels_last
from .augment import CROP_SCALE
from .callbacks import Callback
from .config import RunConfig
from .distillation import FitDistillation
from .finetune import FitFinetuning
from .errors import KecompressError
from .evolution import Evolution
from .files import remove_stale_temporaries, torch_bytes
from .forgetting import for_model, from_settings, settings_of
from .models import output_features, resolve_model
from .manifest import DamagedFile
from .rundir import RunDirectory
from .slim import fit_sized, slice_fit
from .split import Split, split as make_split
from .weights import load_weights


def load_data(config: RunConfig) -> tuple[Dataset, Dataset, list[str]]:
    """The training and validation data sets of ``config`` and the class names: its ImageFolder
    (``data``), or the bundled digits demo.

    Example:
        >>> train, val, classes = load_data(RunConfig())
        >>> len(classes)
        10
    """
    return datasets.load_datasets(config.data, config.image_size, config.val_fraction, config.seed, config.augment,
                                  config.crop_scale or CROP_SCALE)


def build(config: RunConfig, data: tuple[Dataset, Dataset, Sequence[str]] | None = None, *,
          run_dir: str | Path | None = None, resume: bool = False, device: torch.device | str = "cpu",
          precision: str = "fp32", channels_last: bool = False, compile_model: bool = False,
          callbacks: Sequence[Callback] = ()) -> Evolution:
    """The :class:`~kecompress.Evolution` of ``config`` on these data sets, ready to ``run()``.

    The data are ``(train_set, val_set, classes)``, by default :func:`load_data`'s. The model is
    ``config.model`` (an architecture name, torchvision's or ``timm:NAME``, or a model file) for the
    data's classes and image size, seeded from ``config.seed``, with ``config.weights`` loaded into
    it (:func:`~kecompress.weights.load_weights`: a classifier of another size is re-initialised,
    with a ``WeightsNote`` warning); the split is drawn (or, resuming, read from ``run_dir``), and a
    new KELS split is cut once to refuse a model whose fit network cannot be cut out before any
    training; the loss is cross-entropy with ``config.label_smoothing``; the forgetting strategy is
    ``config.forget``'s (:func:`kecompress.forgetting.from_settings`). With ``run_dir`` a new run
    refuses a directory that holds anything, and ``resume`` checks that the directory holds this
    run, then continues from its last checkpoint. The returned loop's ``run_config`` is ``config``
    completed (classes, image size, processes, LLF's start).

    Example:
        >>> # loop = build(config, run_dir="runs/a", callbacks=[progress]); loop.run()
    """
    run_dir = RunDirectory(run_dir) if run_dir is not None else None
    try:
        return _build(config, data, run_dir, resume, device, precision, channels_last, compile_model, callbacks)
    except BaseException:
        if run_dir is not None:
            run_dir.unlock()  # held from here to the end of the run: a run that never starts lets go
        raise


def _build(config, data, run_dir, resume, device, precision, channels_last, compile_model, callbacks) -> Evolution:
    with distributed.fail_together(KecompressError, OSError):  # what one rank finds ends every rank
        if run_dir is not None and distributed.is_main():  # first: before the data set is read
            if resume and run_dir.path.is_dir():  # one writer: held until the run ends
                run_dir.lock()
            check_run_dir(run_dir, resume)
        check_fit_only(config)
        train_set, val_set, classes = data or load_data(config)
        example_inputs = torch.zeros(1, *datasets.input_shape(val_set))
        num_classes = config.num_classes or len(classes)  # a model for other classes is refused below
        config = replace(config, num_classes=len(classes), classes=list(classes),
                         image_size=example_inputs.shape[-1], world_size=distributed.world_size())
        torch.manual_seed(config.seed)
        model = resolve_model(config.model, num_classes, trust_file=config.trust_model_file,
                              image_size=config.image_size)
        if config.weights:
            load_weights(model, config.weights)
        if config.fit_only:  # the network of the fit's shape, freshly initialised, is the run's model
            model, _ = fit_sized(model, config.rate, config.align, example_inputs, seed=config.seed)
        forgetting = for_model(from_settings(config.forget), model)
        config = replace(config, forget=settings_of(forgetting))  # LLF's start named, default or not
        if resume and distributed.is_main():
            run_dir.check_same_run(config)
        outputs = output_features(model, example_inputs)
        if outputs != len(classes):
            raise KecompressError(f"the model has {outputs} outputs but the data has {len(classes)} classes: "
                                  f"pass --num-classes {len(classes)} or a model built for this data")
        if channels_last:
            check_channels_last(model)

    def drawn_split() -> Split:
        rate = 1.0 if config.fit_only else config.rate  # a fit-sized network is all fit
        return make_split(model, config.split, rate, example_inputs=example_inputs, seed=config.seed,
                          align=config.align)

    def split_on_main() -> Split:  # rank 0 owns the run directory; the other ranks get its split
        if resume:
            remove_stale_temporaries(run_dir.path)
            try:
                return run_dir.read_split()
            except DamagedFile:  # drawn again from the seed: used only if byte for byte the one written
                again = drawn_split()
                if not run_dir.repair(RunDirectory.SPLIT, torch_bytes(again.to_dict())):
                    raise
                return again
        new_split = drawn_split()
        if new_split.method == "kels":  # a fit that cannot be cut out is refused now, not after the first generation
            slice_fit(model, new_split, example_inputs=example_inputs)
        if run_dir is not None:
            run_dir.lock()  # a new run's directory exists from here; then refuse one another run began meanwhile
            check_run_dir(run_dir, resume=False)
            remove_stale_temporaries(run_dir.path)  # of a start killed half-way
            run_dir.start(config, new_split, None if config.arch else Path(config.model))
        return new_split

    the_split = distributed.run_on_main(split_on_main)
    with distributed.fail_together(KecompressError):
        the_split.check_matches(model)
        train_loader, val_loader = datasets.make_loaders(
            train_set, val_set, config.batch_size, config.seed, config.workers, rank=distributed.rank(),
            world_size=distributed.world_size(), pin_memory=torch.device(device).type == "cuda")
        loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
        device = torch.device(device)
        loop = Evolution(model, the_split, train_loader, val_loader, config.training, loss_fn=loss_fn,
                         device=device, example_inputs=example_inputs.to(device), run_dir=run_dir,
                         callbacks=callbacks, precision=precision, channels_last=channels_last,
                         compile_model=compile_model, fit_batchnorm=config.fit_batchnorm, forgetting=forgetting,
                         fit_distillation=FitDistillation(**config.distill_fit) if config.distill_fit else None,
                         finetune_fit=FitFinetuning(**config.finetune_fit) if config.finetune_fit else None,
                         run_config=config)
    if resume:
        loop.resume()
    return loop


def check_fit_only(config: RunConfig) -> None:
    """Refuse what a fit-sized network trained from scratch cannot have, in one line.

    Example:
        >>> check_fit_only(RunConfig(fit_only=True, split="wels"))
        Traceback (most recent call last):
        ...
        kecompress.errors.KecompressError: --fit-only trains the KELS fit's shape from scratch: drop --split wels
    """
    if not config.fit_only:
        return
    conflicts = [option for option, present in (("--split wels", config.split != "kels"),
                                                 ("--weights", bool(config.weights)),
                                                 ("--distill-fit", bool(config.distill_fit)),
                                                 ("--finetune-fit", bool(config.finetune_fit))) if present]
    if conflicts:
        raise KecompressError(f"--fit-only trains the KELS fit's shape from scratch: drop {' and '.join(conflicts)}")


def check_run_dir(run_dir: RunDirectory, resume: bool) -> None:
    """Refuse a run directory that is a file, one that holds anything for a new run, and one
    that holds no run to resume.

    Example:
        >>> check_run_dir(RunDirectory("runs/not-there-yet"), resume=False)
    """
    path = run_dir.path
    if path.exists() and not path.is_dir():
        raise KecompressError(f"--out {path} is a file: pass a directory path")
    if resume:
        if not run_dir.is_run():
            raise KecompressError(f"nothing to resume in {path} (no kecompress run there): run without --resume")
    elif not run_dir.is_free():
        what = "holds a kecompress run" if run_dir.is_run() else "is not empty"
        raise KecompressError(f"--out {path} {what}: pass --resume to continue it, or choose another --out")
