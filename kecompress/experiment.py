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
from .edge_popup import EDGE_POPUP_METHODS, apply_edge_popup
from .errors import KecompressError
from .evolution import Evolution
from .files import remove_stale_temporaries, torch_bytes
from .finetune import FinetuneStep, FitFinetuning
from .forgetting import for_model, from_settings, settings_of
from .manifest import DamagedFile
from .models import output_features, resolve_model
from .rundir import RunDirectory
from .shape import Selection, SlimmingLoss, learned_split
from .slim import fit_shaped, fit_sized, slice_fit
from .split import Split, split as make_split
from .training import EpochLoop
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
        check_edge_popup(config)
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
        selection = run_selection(config)
        teacher = _teacher(config, len(classes)) if config.distill_from_run else None
        if selection and selection.widths == "global" and not resume:  # a budget no shape meets: refused before training
            learned_split(model, config.rate, select="first", widths="global", fit_macs=selection.fit_macs,
                          align=config.align, example_inputs=example_inputs)
        shaping = None
        if config.fit_only and (config.shape_from or selection):  # a borrowed or learned shape
            shaping = run_dir.read_shape() if resume else \
                _fit_shape(config, model, selection, train_set, example_inputs, device)
            model = fit_shaped(model, shaping, example_inputs, seed=config.seed)
        elif config.fit_only:  # the network of the fit's shape, freshly initialised, is the run's model
            model, _ = fit_sized(model, config.rate, config.align, example_inputs, seed=config.seed,
                                 grouped=config.grouped)
        if config.split in EDGE_POPUP_METHODS:  # frozen random weights; only the scores train
            apply_edge_popup(model, config.split, config.rate, example_inputs, config.align)
        forgetting = for_model(from_settings(config.forget), model)
        config = replace(config, forget=settings_of(forgetting))  # LLF's start named, default or not
        if resume and distributed.is_main():
            run_dir.check_same_run(config, model)
        outputs = output_features(model, example_inputs)
        if outputs != len(classes):
            raise KecompressError(f"the model has {outputs} outputs but the data has {len(classes)} classes: "
                                  f"pass --num-classes {len(classes)} or a model built for this data")
        if channels_last:
            check_channels_last(model)

    # Edge-popup learns its split while training: the loop reads it from the scores, and the
    # run directory receives the one they chose at the end.
    learned = Split(config.split, config.rate, config.seed, align=config.align) \
        if config.split in EDGE_POPUP_METHODS else None

    def drawn_split() -> Split:
        rate = 1.0 if config.fit_only else config.rate  # a fit-sized network is all fit
        return make_split(model, config.split, rate, example_inputs=example_inputs, seed=config.seed,
                          align=config.align, grouped=config.grouped)

    def split_on_main() -> Split:  # rank 0 owns the run directory; the other ranks get its split
        if resume:
            remove_stale_temporaries(run_dir.path)
            if learned:
                return learned
            try:
                return run_dir.read_split()
            except DamagedFile:  # drawn again from the seed: used only if byte for byte the one written
                again = drawn_split()
                if not run_dir.repair(RunDirectory.SPLIT, torch_bytes(again.to_dict())):
                    raise
                return again
        new_split = learned or drawn_split()
        if selection and not config.fit_only and selection.after == 0:  # from pretrained weights: chosen now
            new_split = selection.choose(model, new_split, example_inputs, _in_order(train_set, config),
                                         _loss(config))
        if new_split.method == "kels":  # a fit that cannot be cut out is refused now, not after the first generation
            slice_fit(model, new_split, example_inputs=example_inputs)
        if run_dir is not None:
            run_dir.lock()  # a new run's directory exists from here; then refuse one another run began meanwhile
            check_run_dir(run_dir, resume=False)
            remove_stale_temporaries(run_dir.path)  # of a start killed half-way
            run_dir.start(config, new_split, None if config.arch else Path(config.model))
            if shaping is not None:
                run_dir.write_shape(shaping)
        return new_split

    the_split = distributed.run_on_main(split_on_main)
    with distributed.fail_together(KecompressError):
        the_split.check_matches(model)
        train_loader, val_loader = datasets.make_loaders(
            train_set, val_set, config.batch_size, config.seed, config.workers, rank=distributed.rank(),
            world_size=distributed.world_size(), pin_memory=torch.device(device).type == "cuda")
        loss_fn = _loss(config)
        device = torch.device(device)
        loop = Evolution(model, the_split, train_loader, val_loader, config.training, loss_fn=loss_fn,
                         device=device, example_inputs=example_inputs.to(device), run_dir=run_dir,
                         callbacks=callbacks, precision=precision, channels_last=channels_last,
                         compile_model=compile_model, fit_batchnorm=config.fit_batchnorm, forgetting=forgetting,
                         fit_distillation=FitDistillation(**config.distill_fit) if config.distill_fit else None,
                         finetune_fit=FitFinetuning(**config.finetune_fit) if config.finetune_fit else None,
                         run_config=config, selection=None if config.fit_only else selection)
        if teacher is not None:
            learn_from(loop, teacher, FitFinetuning(1))
    if resume:
        loop.resume()
    return loop


def check_fit_only(config: RunConfig) -> None:
    """Refuse what a fit-sized network trained from scratch cannot have, and the options only it
    has without it, in one line.

    Example:
        >>> check_fit_only(RunConfig(fit_only=True, split="wels"))
        Traceback (most recent call last):
        ...
        kecompress.errors.KecompressError: --fit-only trains the KELS fit's shape from scratch: drop --split wels
    """
    if not config.fit_only:
        only = [option for option, present in (("--shape-from", bool(config.shape_from)),
                                               ("--distill-from-run", bool(config.distill_from_run)),
                                               ("--shape-epochs", bool(config.shape_epochs))) if present]
        if only:
            raise KecompressError(f"{' and '.join(only)} train a network of the fit's shape from scratch: "
                                  "pass --fit-only too")
        return
    learned = (config.select, config.widths) != ("first", "uniform")
    conflicts = [option for option, present in (("--split wels", config.split != "kels"),
                                                 ("--weights", bool(config.weights)),
                                                 ("--distill-fit", bool(config.distill_fit)),
                                                 ("--finetune-fit", bool(config.finetune_fit)),
                                                 ("--select and --widths", bool(config.shape_from) and learned))
                 if present]
    if conflicts:
        raise KecompressError(f"--fit-only trains the KELS fit's shape from scratch: drop {' and '.join(conflicts)}")
    if learned and not config.shape_epochs:
        raise KecompressError("--fit-only with a learned shape trains the dense network first to learn it: "
                              "pass --shape-epochs N (e.g. a tenth of --epochs)")
    if config.shape_epochs and not learned:
        raise KecompressError("--shape-epochs learns a shape: pass --widths global or --select bn-scale (or "
                              "magnitude, taylor) too, or drop --shape-epochs")


def run_selection(config: RunConfig) -> Selection | None:
    """How ``config``'s fit is chosen by importance (:mod:`kecompress.shape`); None for the paper's rule.

    Example:
        >>> run_selection(RunConfig(select="bn-scale", widths="global", fit_macs=0.3)).fit_macs
        0.3
        >>> run_selection(RunConfig()) is None
        True
    """
    selection = Selection(config.select, config.widths, config.fit_macs,
                          after=0 if config.weights else config.select_after, sparsity=config.sparsity)
    if not selection.learned:
        if config.sparsity:
            raise KecompressError("--sparsity penalises BatchNorm scales while the shape is learned: pass "
                                  "--select bn-scale or --widths global too, or drop --sparsity")
        return None
    if config.split != "kels":
        raise KecompressError("choosing the fit by importance needs a KELS split: drop --select and --widths "
                              "or use --split kels")
    if not config.fit_only and not config.weights and config.select_after >= config.training.generations:
        raise KecompressError(f"--select-after {config.select_after} leaves no generation after it of the "
                              f"{config.training.generations}: choose a smaller --select-after or more --generations")
    return selection


def _loss(config: RunConfig):
    return torch.nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)


def _in_order(train_set, config: RunConfig):
    """The training data unshuffled, for the gradients of the taylor selection."""
    return torch.utils.data.DataLoader(train_set, batch_size=config.batch_size or 32)


def _fit_shape(config: RunConfig, model, selection: Selection | None, train_set, example_inputs, device):
    """The split of ``model`` whose fit gives a fit-only run its shape: another run's
    (``shape_from``), or learned by training the dense network ``shape_epochs`` epochs (network
    slimming's penalty on, with ``sparsity``) and choosing by importance."""
    if config.shape_from:
        return _borrowed_shape(config, model, example_inputs)
    shape_config = replace(config.training, generations=1, epochs=config.shape_epochs, warmup_epochs=0)
    loader = datasets.make_loaders(train_set, train_set, config.batch_size, config.seed, config.workers,
                                   rank=distributed.rank(), world_size=distributed.world_size())[0]
    dense = Evolution(model, make_split(model, "kels", 1.0, example_inputs=example_inputs), loader, loader,
                      shape_config, loss_fn=_loss(config), device=device, example_inputs=example_inputs.to(device))
    if selection.sparsity:
        dense.step.loss_fn = SlimmingLoss(dense.loss_fn, dense.model, selection.sparsity)
    for epoch in range(config.shape_epochs):
        dense.train_epoch(generation=1, epoch=epoch)
    model.cpu()
    start = make_split(model, "kels", config.rate, example_inputs=example_inputs, align=config.align)
    return selection.choose(model, start, example_inputs, _in_order(train_set, config), _loss(config))


def _borrowed_shape(config: RunConfig, model, example_inputs) -> Split:
    """The split of ``model`` that gives the fit of the run in ``config.shape_from`` its shape."""
    source = RunDirectory(config.shape_from)
    if not source.is_run():
        raise KecompressError(f"--shape-from {config.shape_from} holds no kecompress run: pass the --out of a "
                              "`kecompress evolve` run")
    theirs = source.read_config()
    if theirs.model != config.model or theirs.num_classes != config.num_classes:
        raise KecompressError(f"--shape-from {config.shape_from} is a run of {theirs.model} for {theirs.num_classes} "
                              f"classes, not of {config.model} for this data: pass a run of the same model and data")
    if theirs.fit_only:
        shaping = source.read_shape() or make_split(model, "kels", theirs.rate, example_inputs=example_inputs,
                                                    align=theirs.align)
    else:
        shaping = source.read_split()
    if shaping.method != "kels":
        raise KecompressError(f"--shape-from {config.shape_from} has a WELS split, whose fit is sparse and has no "
                              "shape of its own: pass a KELS run")
    try:
        shaping.check_matches(model)
    except KecompressError as error:
        raise KecompressError(f"--shape-from {config.shape_from} was made for another model: {error}") from None
    return shaping


def _teacher(config: RunConfig, classes: int):
    """The dense network of the finished run ``config.distill_from_run``, the fit-only network's teacher."""
    dense, _, theirs = RunDirectory(config.distill_from_run).load(config.trust_model_file)
    if theirs.num_classes != classes:
        raise KecompressError(f"--distill-from-run {config.distill_from_run} has {theirs.num_classes} classes and "
                              f"this data {classes}: pass a run trained on the same data")
    return dense


def learn_from(loop: Evolution, teacher: torch.nn.Module, distillation: FitFinetuning) -> Evolution:
    """``loop``'s network (a fit-only one, say) learning in every step from ``teacher``'s predictions
    too, with ``distillation``'s loss (Hinton et al.'s: temperature 4, half the labels' loss); the
    teacher frozen, in eval mode.

    Example:
        >>> # learn_from(experiment.build(fit_only_config), teacher, FitFinetuning(1)).run()
    """
    teacher.to(loop.device).eval().requires_grad_(False)
    loop.step = FinetuneStep(loop.model, teacher, distillation, loop.loss_fn, loop.amp, loop.device)
    loop.epochs = EpochLoop(loop, loop.model, loop.step)
    return loop


def check_edge_popup(config: RunConfig) -> None:
    """Refuse what an edge-popup run cannot have, in one line: it trains scores over frozen random
    weights for one generation, without weight decay (Ramanujan et al.'s settings).

    Example:
        >>> from kecompress.config import TrainingConfig
        >>> check_edge_popup(RunConfig(split="edge-popup", training=TrainingConfig(generations=1, weight_decay=0)))
        >>> check_edge_popup(RunConfig(split="edge-popup", rate=1.0))
        Traceback (most recent call last):
        ...
        kecompress.errors.KecompressError: edge-popup keeps a fraction in (0, 1) of the weights, got --rate 1.0: e.g. --rate 0.5
    """
    if config.split not in EDGE_POPUP_METHODS:
        return
    if not 0 < config.rate < 1:
        raise KecompressError(f"edge-popup keeps a fraction in (0, 1) of the weights, got --rate {config.rate}: "
                              "e.g. --rate 0.5")
    if config.training.generations != 1:
        raise KecompressError("edge-popup trains its scores once: pass --generations 1 (all the epochs in --epochs)")
    conflicts = [option for option, present in (("--forget", config.forget != {"name": "ke"}),
                                                 ("--distill-fit", bool(config.distill_fit)),
                                                 ("--finetune-fit", bool(config.finetune_fit)),
                                                 ("--fit-only", config.fit_only),
                                                 ("--weights", bool(config.weights))) if present]
    if conflicts:
        raise KecompressError(f"edge-popup searches frozen random weights for one generation: drop "
                              f"{' and '.join(conflicts)}")
    if config.training.weight_decay != 0:
        raise KecompressError(f"edge-popup trains its scores without weight decay (the paper's setting), got "
                              f"{config.training.weight_decay}: pass --weight-decay 0")


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
