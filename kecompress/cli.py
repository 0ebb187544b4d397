"""The ``kecompress`` command line: a thin shell over the Python API.

Every user error ends in one line on stderr naming the problem and the fix, exit status 2.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import sys
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from pathlib import Path

import click
from click.core import ParameterSource
import torch
from rich.console import Console

from . import __version__, distributed, experiment
from .acceleration import PRECISIONS, MixedPrecision, check_compile
from .augment import AUGMENTATIONS, CROP_SCALE, SMALL_IMAGES, check_augmentation, default_augmentation
from .bench import CLOCKS, RUNTIMES, cpu_instruction_sets, describe_cpu_flags, latency_table, measure_latency
from .callbacks import TensorBoard
from .charts import plot_generations
from .config import FIT_BATCHNORM, RunConfig, TrainingConfig, processes
from .data import FOLDER_IMAGE_SIZE, demo_datasets, image_folder_datasets, without_augmentation
from .distillation import FitDistillation
from .edge_popup import EDGE_POPUP_METHODS, apply_edge_popup, plain_network, scores_split
from .finetune import FitFinetuning
from .errors import KecompressError
from .evaluation import parameter_count
from .export import DEFAULT_EXPORTER, EXPORTERS, LOWEST_OPSET, MAX_OPSET, MIN_OPSET, PAIR_FILES, export_pair, \
    export_table
from .files import atomic_path, staged_directory
from .forgetting import STRATEGIES, ShrinkPerturb, describe, from_settings, settings_of
from .info import info_view, split_info
from .interrupt import RunInterrupted
from .models import output_features, resolve_model
from .node_kinds import CONV_KINDS
from .quantize import (CALIBRATION_IMAGES, INT8_PAIR_FILES, LOSING_KINDS, MAX_ACCURACY_DROP, calibration_subset,
                       check_keep_fp32, quantize_pair)
from .report import RichProgress, finetune_line, generations_table
from .manifest import DamagedFile
from .rundir import RunDirectory, RunNote, load_fit
from .runfile import evolve_defaults, read_run_file, run_file_text
from .shape import SELECTIONS, WIDTHS, learned_split
from .slim import fit_network, slice_fit
from .split import GROUPED, METHODS, split as make_split
from .weights import WeightsNote

console = Console()

TRUST_HELP = "load a model file with full pickle, which can run code from it: only for files you trust"

# Option ranges: click refuses anything outside them in one line, before any work starts.
POSITIVE = click.IntRange(min=1)
RATE = click.FloatRange(0, 1, min_open=True)
ALIGN = click.IntRange(min=1)
ALIGN_HELP = ("KELS: every coupled group of channels keeps a multiple of N (its count rounded up; e.g. 8 or 16, "
              "the block widths fast kernels compute in); 1: the paper's rule")
GROUPED_HELP = ("KELS: how a grouped convolution (ResNeXt, RegNet) is cut: whole-groups keeps a rate share of its "
                "groups at full width (runs fast), narrow keeps a rate share of every group (the paper's rule)")
FRACTION = click.FloatRange(0, 1, min_open=True, max_open=True)
IMAGE_SIZE = click.IntRange(min=8)
UNIT = click.FloatRange(0, 1)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(__version__, prog_name="kecompress")
def app():
    """Knowledge Evolution for PyTorch: split, evolve, slice, export, measure."""


@app.command()
@click.argument("model")
@click.option("--split", "split_method", type=click.Choice(METHODS + EDGE_POPUP_METHODS), default="kels",
              help="kels (slim fit) or wels (sparse fit); edge-popup (a sparse sub-network of frozen random weights, "
                   "found by learned scores, one generation) or edge-popup-kels (its channels, a slim network)")
@click.option("--rate", type=RATE, default=0.5, help="split rate in (0, 1]")
@click.option("--align", type=ALIGN, default=1, metavar="N", help=ALIGN_HELP)
@click.option("--grouped", type=click.Choice(GROUPED), default=None,
              help=GROUPED_HELP + " [default: whole-groups; with --resume, the run's own]")
@click.option("--generations", type=POSITIVE, default=5, help="number of generations")
@click.option("--epochs", type=POSITIVE, default=10, help="epochs per generation")
@click.option("--data", type=click.Path(path_type=Path), default=None,
              help="ImageFolder directory (train/ and val/, or class folders); absent: the bundled 8x8 digits")
@click.option("--num-classes", type=POSITIVE, default=None,
              help="classes of an architecture built by name (default: inferred from the data)")
@click.option("--image-size", type=IMAGE_SIZE, default=None, help="input size (default 224, 32 for the demo data)")
@click.option("--val-fraction", type=FRACTION, default=0.2, help="held-out fraction when --data has no val/")
@click.option("--augment", type=click.Choice(AUGMENTATIONS), default=None,
              help=f"training augmentation of --data: resized-crop (ImageNet's random-resized crop and flip), pad-crop "
                   f"(padded random crop and flip, as for CIFAR), none [default: pad-crop up to {SMALL_IMAGES} px, "
                   "resized-crop above]")
@click.option("--crop-scale", type=(RATE, RATE), default=CROP_SCALE, metavar="MIN MAX",
              help="resized-crop: the share of the image's area a crop takes")
@click.option("--workers", type=click.IntRange(0), default=0,
              help="data loading processes (images are decoded once and kept in memory; augmenting them is cheap)")
@click.option("--batch-size", type=POSITIVE, default=32, help="batch size (of each process under torchrun)")
@click.option("--lr", type=click.FloatRange(0, min_open=True), default=0.1,
              help="SGD learning rate (momentum 0.9, cosine schedule)")
@click.option("--weight-decay", type=click.FloatRange(0), default=1e-4, help="SGD weight decay")
@click.option("--warmup-epochs", type=click.IntRange(0), default=0,
              help="linear warm-up epochs at the start of each generation (fewer than --epochs)")
@click.option("--label-smoothing", type=click.FloatRange(0, 1, max_open=True), default=0.1,
              help="label smoothing of the cross-entropy loss")
@click.option("--seed", type=int, default=0, help="seed of the split, the data order and the resets")
@click.option("--out", type=click.Path(path_type=Path), default=Path("runs/ke"),
              help="run directory to create (or to resume)")
@click.option("--resume", is_flag=True, help="continue the run in --out from its last checkpoint")
@click.option("--target-accuracy", type=RATE, default=None,
              help="stop once the fit hypothesis reaches this validation accuracy (a fraction in (0, 1])")
@click.option("--fit-batchnorm", type=click.Choice(FIT_BATCHNORM), default="re-estimated",
              help="the fit network's BatchNorm statistics: re-estimated on the training images for the fit "
                   "network alone, or inherited from the dense network (KE's paper)")
@click.option("--forget", type=click.Choice(list(STRATEGIES)), default="ke",
              help="what happens before every generation but the first: ke (re-draw the reset hypothesis, keep the "
                   "fit), llf (re-draw every conv and linear layer from --forget-from on), shrink-perturb (shrink "
                   "every parameter, add a fresh draw), none (nothing: only the new optimizer and schedule)")
@click.option("--forget-from", metavar="NAME", default=None,
              help="llf: the module to re-draw from, e.g. layer4 [default: the model's last stage]")
@click.option("--shrink", type=UNIT, default=None,
              help=f"shrink-perturb: the factor of the trained parameters [default: {ShrinkPerturb.shrink}]")
@click.option("--perturb", type=UNIT, default=None,
              help=f"shrink-perturb: the factor of the fresh draw [default: {ShrinkPerturb.perturb}]")
@click.option("--distill-fit/--no-distill-fit", default=False,
              help="in-place distillation: every step also trains the fit network on the dense network's predictions")
@click.option("--distill-temperature", type=click.FloatRange(0, min_open=True), default=1.0,
              help="temperature of the fit's distillation")
@click.option("--distill-weight", type=click.FloatRange(0), default=1.0, help="weight of the fit's distillation term")
@click.option("--distill-label-weight", type=click.FloatRange(0), default=0.0,
              help="weight of the fit's own loss on the labels, beside its distillation term")
@click.option("--distill-from", "distill_start", type=POSITIVE, default=FitDistillation.start_generation,
              help="the first generation whose steps distil the fit (measured: from the first, it pulled both "
                   "networks down)")
@click.option("--distill-ramp", type=click.FloatRange(0), default=FitDistillation.ramp_epochs, metavar="EPOCHS",
              help="raise the fit's distillation term linearly from 0 over its first EPOCHS epochs")
@click.option("--finetune-fit", type=click.IntRange(0), default=0, metavar="EPOCHS",
              help="after the last generation, fine-tune the fit network alone for EPOCHS epochs with knowledge "
                   "distillation from the dense network (KELS); fit.pt is then the fine-tuned network")
@click.option("--fit-only/--no-fit-only", default=False,
              help="no KE: train a network of the KELS fit's shape at --rate, freshly initialised, from scratch "
                   "(the recipe docs/results.md measured best for a slim network on small data; use "
                   "--generations 1 and all the epochs in --epochs)")
@click.option("--select", type=click.Choice(SELECTIONS), default="first",
              help="KELS: which channels each coupled group keeps: first (the paper's rule), or the most important by "
                   "magnitude (group L2 norm), bn-scale (BatchNorm scale, network slimming) or taylor (weight x "
                   "gradient); chosen on the dense network after --select-after, then fixed")
@click.option("--select-after", type=POSITIVE, default=1, metavar="G",
              help="--select/--widths: the generation after which the fit is chosen (from --weights: before the first)")
@click.option("--widths", type=click.Choice(WIDTHS), default="uniform",
              help="KELS: how many channels each group keeps: uniform (--rate of each) or global (one importance "
                   "ranking across all groups, to the budget --fit-macs)")
@click.option("--fit-macs", type=FRACTION, default=None, metavar="F",
              help="--widths global: the fit's share of the dense network's MACs [default: the uniform fit's at "
                   "--rate and --align]")
@click.option("--sparsity", type=click.FloatRange(0), default=0.0, metavar="L1",
              help="network slimming: L1 penalty on BatchNorm scales while the shape is being learned (e.g. 1e-4)")
@click.option("--shape-epochs", type=click.IntRange(0), default=0, metavar="N",
              help="--fit-only with --select/--widths: train the dense network N epochs to learn the shape first "
                   "(its cost is part of the run's), then the network of that shape from scratch")
@click.option("--shape-from", type=click.Path(path_type=Path), default=None, metavar="RUN",
              help="--fit-only: train a freshly initialised network of the shape of RUN's fit (Liu et al. 2019's test)")
@click.option("--distill-from-run", type=click.Path(path_type=Path), default=None, metavar="RUN",
              help="--fit-only: every step also learns from the finished run RUN's dense network (knowledge "
                   "distillation, temperature 4, half the labels' loss)")
@click.option("--device", default="auto", help="cpu, cuda, cuda:N or auto")
@click.option("--precision", type=click.Choice(list(PRECISIONS)), default="fp32",
              help="fp32, or mixed precision: bf16 or fp16 (with a gradient scaler) under autocast")
@click.option("--channels-last", is_flag=True,
              help="channels-last memory format for convolutional networks (helps GPUs with bf16/fp16)")
@click.option("--compile", "compile_model", is_flag=True,
              help="train through torch.compile: slow to start, then faster (needs g++ on the CPU, triton on a GPU)")
@click.option("--tensorboard", type=click.Path(path_type=Path), default=None,
              help="also write TensorBoard event files to this directory (pip install 'kecompress[tensorboard]')")
@click.option("--weights", type=click.Path(path_type=Path), default=None,
              help="a pretrained start: a state dict (or a checkpoint holding one) loaded into MODEL before the split; "
                   "a classifier of another size starts re-initialised")
@click.option("--trust-model-file", is_flag=True, help=TRUST_HELP)
@click.option("--config", type=click.Path(path_type=Path, dir_okay=False), is_eager=True, expose_value=False,
              callback=lambda ctx, _, path: _read_run_file(ctx, path), metavar="FILE",
              help="take the run's settings from a TOML or JSON file (a run directory's config.json, or what "
                   "--print-config wrote); options given on the command line override it")
@click.option("--print-config", is_flag=False, flag_value="-", default=None, metavar="[FILE]",
              help="write the run's settings to FILE (TOML if named .toml, JSON otherwise) or, without FILE, as "
                   "TOML to stdout, and stop without running; --config FILE repeats the run")
def evolve(model, split_method, rate, align, grouped, generations, epochs, data, num_classes, image_size, val_fraction,
           augment,
           crop_scale, workers,
           batch_size, lr, weight_decay, warmup_epochs, label_smoothing, seed, out, resume, target_accuracy,
           fit_batchnorm, forget, forget_from, shrink, perturb, distill_fit, distill_temperature, distill_weight,
           distill_label_weight, distill_start, distill_ramp, finetune_fit, fit_only, select, select_after, widths,
           fit_macs, sparsity, shape_epochs, shape_from, distill_from_run, device, precision, channels_last,
           compile_model, tensorboard, weights, trust_model_file, print_config):
    """Train MODEL for several generations of Knowledge Evolution.

    MODEL is a torchvision architecture name (resnet18), a timm model as timm:NAME (timm:resnet18d;
    pip install 'kecompress[timm]'), or a .pt file holding a whole model.

    For a slim network on small data, the scoreboard in docs/results.md measured the fit-sized
    network trained from scratch best or tied-best on three of its four tables (--fit-only
    --generations 1, all the epochs in --epochs): KE's fit, distilled in place (--distill-fit) or
    fine-tuned (--finetune-fit E), tied or lost to it at about four times the training cost. For
    the dense network, --forget shrink-perturb was best on three of the four. A learned shape
    (--fit-only --select bn-scale --widths global --shape-epochs N) tied it on the digits and lost
    on Animal-Shape. KE stays the default, the method this tool implements.

    Under torchrun (e.g. torchrun --nproc_per_node 2 -m kecompress evolve MODEL ...) it trains
    with DistributedDataParallel, one process per GPU or per group of CPU cores: every rank
    trains on its part of the data, rank 0 writes the run directory and prints.

    A run is repeated with --config RUN_DIR/config.json --out NEW_DIR.
    """
    forget_from, shrink, perturb = _forgetting_options_of(click.get_current_context(), forget_from, shrink, perturb)
    if _from_file_beside(click.get_current_context(), "num_classes", "data"):  # the classes of the file's data
        num_classes = None
    distributed.setup(device)  # first: errors found on one rank below are then shared with all
    if not distributed.is_main():  # rank 0 shows each warning once; errors still show
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)
    with distributed.fail_together(KecompressError, OSError):
        if split_method in EDGE_POPUP_METHODS:
            weight_decay = _edge_popup_options(weight_decay)
        check_augmentation(augment or "none", crop_scale)
        training = TrainingConfig(generations=generations, epochs=epochs, lr=lr, weight_decay=weight_decay,
                                  warmup_epochs=warmup_epochs, seed=seed, target=target_accuracy)
        forgetting = _forgetting(forget, forget_from, shrink, perturb)
        torch_device = distributed.local_device(_device(device))
        MixedPrecision(precision, torch_device)
        if compile_model:
            check_compile(torch_device)
        callbacks = [TensorBoard(tensorboard)] if tensorboard and distributed.is_main() else []
        distillation = FitDistillation(distill_temperature, distill_weight, distill_label_weight, distill_start,
                                       distill_ramp) if distill_fit else None
        if grouped is None:  # a run made before --grouped existed narrowed its groups: it resumes as it was made
            grouped = _grouped_of(RunDirectory(out)) if resume else "whole-groups"
    config = RunConfig(model=model, num_classes=num_classes, weights=str(weights.resolve()) if weights else None,
                       split=split_method, rate=rate, align=align, grouped=grouped, seed=seed,
                       data=str(data.resolve()) if data else None, image_size=image_size,
                       val_fraction=val_fraction, batch_size=batch_size, label_smoothing=label_smoothing,
                       augment=(augment or default_augmentation(image_size or FOLDER_IMAGE_SIZE)) if data else None,
                       crop_scale=list(crop_scale) if data else None, workers=workers,
                       fit_batchnorm=fit_batchnorm, forget=forgetting, training=training,
                       trust_model_file=trust_model_file, distill_fit=distillation and distillation.identity(),
                       finetune_fit=FitFinetuning(finetune_fit).identity() if finetune_fit else None,
                       fit_only=fit_only, select=select, select_after=select_after, widths=widths,
                       fit_macs=fit_macs, sparsity=sparsity, shape_epochs=shape_epochs,
                       shape_from=str(shape_from.resolve()) if shape_from else None,
                       distill_from_run=str(distill_from_run.resolve()) if distill_from_run else None)
    if print_config:
        _print_run_file(replace(config, world_size=distributed.world_size()), print_config)
        return
    _note_other_world_size(click.get_current_context())
    progress = RichProgress(generations, console=console) if distributed.is_main() else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", WeightsNote)
        warnings.simplefilter("always", RunNote)
        loop = experiment.build(config, run_dir=out, resume=resume, device=torch_device, precision=precision,
                                channels_last=channels_last, compile_model=compile_model,
                                callbacks=([progress] if progress else []) + callbacks)
    for warning in caught:  # a note on the weights in one line; any other warning as Python shows it
        if issubclass(warning.category, WeightsNote):
            _print_on_main(f"note: {warning.message}")
        elif issubclass(warning.category, RunNote):  # now, not at the end of the run
            _print_note(str(warning.message))
        else:
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    the_split = loop.split
    val_images = int(distributed.all_sum([len(loop.val_loader.dataset)])[0])  # each rank holds a part
    processes = (f"; {distributed.world_size()} processes ({torch.distributed.get_backend()})"
                 if distributed.is_distributed() else "")
    shape = (f"the shape of {shape_from}'s fit" if shape_from else
             f"a shape learned by {select}, {widths} widths, in {shape_epochs} dense epochs"
             if (select, widths) != ("first", "uniform") else f"its KELS fit's shape at rate {rate}")
    what = (f"the network of {shape}, from scratch ({parameter_count(loop.model):,} parameters)"
            if fit_only else describe_split(the_split))
    _print_on_main(f"[bold]kecompress evolve[/] {model}: {what}, "
                   f"forgetting {describe(loop.run_config.forget)}; "
                   f"{len(loop.train_loader.dataset)} training / {val_images} validation images, "
                   f"{len(loop.run_config.classes)} classes; device {torch_device}, {precision}{processes}; "
                   f"run directory {out}")
    with progress or nullcontext():
        history = loop.run()
    last, files, finetune = history[-1], loop.run_dir, loop.progress.finetune
    slim = the_split.method in ("kels", "edge-popup-kels")  # a fit.pt was written
    _print_on_main(f"done: generation {last.generation}, dense accuracy {last.dense:.2%}, "
                   f"fit accuracy {last.fit:.2%}" + (f", {finetune.fit:.2%} fine-tuned" if finetune else "")
                   + f"; metrics in {files.metrics_file} (chart: {files.chart_file}), "
                   f"final models in {files.dense_file}" + (f" and {files.fit_file}" if slim else ""))


def describe_split(the_split) -> str:
    """The split in words, its fit fraction beside rate² (what the paper's rule keeps of a KELS split).

    Example:
        >>> import kecompress
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
        >>> describe_split(kecompress.split(model, "kels", 0.25, align=8))  # 8 of 16 hidden channels, not 4
        'KELS split at rate 0.25 aligned to 8 channels, fit 50.6% of 178 split parameters (rate² 6.2%)'
    """
    if the_split.method in EDGE_POPUP_METHODS:
        what = "channels of every coupled group" if the_split.method == "edge-popup-kels" else "weights of every layer"
        return (f"{the_split.method} at rate {the_split.rate}: learned scores keep {the_split.rate:.0%} of the {what} "
                "of frozen random weights")
    aligned = f" aligned to {the_split.align} channels" if the_split.align != 1 else ""
    paper = f" (rate² {the_split.rate ** 2:.1%})" if the_split.method == "kels" else ""
    chosen = ""
    if (the_split.select, the_split.widths) != ("first", "uniform"):
        budget = f" to {the_split.fit_macs:.3g} of the dense MACs" if the_split.fit_macs is not None else ""
        chosen = f", channels by {the_split.select}, {the_split.widths} widths{budget}"
    return (f"{the_split.method.upper()} split at rate {the_split.rate}{aligned}{chosen}, fit "
            f"{the_split.fit_fraction():.1%} of {the_split.total_count():,} split parameters{paper}")


def _read_run_file(ctx: click.Context, path: Path | None) -> None:
    """``--config``: the file's settings become the defaults of evolve's options (checked as the
    options are, the file named), which the command line overrides."""
    if path is None:
        return
    values = read_run_file(path)
    defaults = evolve_defaults(values, path)
    options = {param.name: param for param in ctx.command.params}
    for name, value in defaults.items():
        try:
            options[name].type_cast_value(ctx, value)
        except click.BadParameter as error:
            option = options[name].opts[0] if isinstance(options[name], click.Option) else name.upper()
            raise KecompressError(f"{path}: the value of {option}, {value!r}: {error.message}") from None
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    ctx.meta["kecompress.run_file"] = (path, values.get("world_size"))


def _forgetting_options_of(ctx: click.Context, forget_from, shrink, perturb):
    """A --forget given on the command line drops the settings that --config gave another strategy."""
    return tuple(None if _from_file_beside(ctx, name, "forget") else value
                 for name, value in (("forget_from", forget_from), ("shrink", shrink), ("perturb", perturb)))


def _from_file_beside(ctx: click.Context, name: str, given: str) -> bool:
    """Whether option ``name`` came from --config while option ``given``, which it depends on, came
    from the command line: the file's value belonged to the file's ``given``."""
    return (ctx.get_parameter_source(name) is ParameterSource.DEFAULT_MAP
            and ctx.get_parameter_source(given) is ParameterSource.COMMANDLINE)


def _print_run_file(config: RunConfig, where: str) -> None:
    """``--print-config``: the settings to stdout (``-``) or to a new file."""
    if not distributed.is_main():
        return
    if where == "-":
        click.echo(run_file_text(config), nl=False)
        return
    path = Path(where)
    if path.exists():
        raise KecompressError(f"--print-config {path} exists: choose another file name, or remove it first")
    with atomic_path(path) as target:
        Path(target).write_text(run_file_text(config, as_toml=path.suffix.lower() == ".toml"))
    click.echo(f"settings written to {path}: run them with kecompress evolve --config {shlex.quote(str(path))}")


def _note_other_world_size(ctx: click.Context) -> None:
    path, world_size = ctx.meta.get("kecompress.run_file", (None, None))
    if world_size and world_size != distributed.world_size():
        _print_on_main(f"note: {path} was trained by {processes(world_size)} and this run has "
                       f"{processes(distributed.world_size())}: a step's images differ, so will the results")


def _grouped_of(run_dir: RunDirectory) -> str:
    """How the run in ``run_dir`` cuts grouped convolutions; a new run's default where it has no
    readable configuration (a damaged config.json is made again, or refused, when the run resumes)."""
    try:
        return run_dir.read_config().grouped if run_dir.is_run() else "whole-groups"
    except DamagedFile:
        return "whole-groups"


def _forgetting(name: str, forget_from: str | None, shrink: float | None, perturb: float | None) -> dict:
    """The ``--forget`` options as a run records them; an option of another strategy is refused."""
    if forget_from is not None and name != "llf":
        raise KecompressError(f"--forget-from applies to --forget llf, not --forget {name}: drop it or pass --forget llf")
    tuning = {key: value for key, value in (("shrink", shrink), ("perturb", perturb)) if value is not None}
    if tuning and name != "shrink-perturb":
        raise KecompressError(f"--{next(iter(tuning))} applies to --forget shrink-perturb, not --forget {name}: "
                              "drop it or pass --forget shrink-perturb")
    options = {"llf": {"start": forget_from}, "shrink-perturb": tuning}.get(name, {})
    return settings_of(from_settings({"name": name, **options}))


def _edge_popup_options(weight_decay: float) -> float:
    """Edge-popup's weight decay (none unless asked); --forget, which acts between generations, refused."""
    context = click.get_current_context()
    if context.get_parameter_source("forget") != click.core.ParameterSource.DEFAULT:
        raise KecompressError("--forget acts between generations, and edge-popup trains one: drop --forget")
    if context.get_parameter_source("weight_decay") == click.core.ParameterSource.DEFAULT:
        return 0.0  # the paper's: no weight decay on the scores, the only parameters that train
    return weight_decay


def _print_on_main(message: str) -> None:
    if distributed.is_main():
        console.print(message)


@app.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help=f"PNG file to write [default: RUN_DIR/{RunDirectory.CHART} for one run, ./{RunDirectory.CHART} "
                   "for several]")
@click.option("--label", "labels", multiple=True, help="legend label of each run, in order [default: directory names]")
@click.option("--force", is_flag=True, help="replace --out if it exists")
def report(run_dirs, out, labels, force):
    """Print the generations of one or more runs and chart them (dense and fit against generation).

    RUN_DIRS are `kecompress evolve --out` directories (or Python runs' run_dir), finished or still running.
    """
    if labels and len(labels) != len(run_dirs):
        raise KecompressError(f"{len(labels)} --label for {len(run_dirs)} run directories: "
                              "give one --label per run, in order, or none")
    names = list(labels) or _short_names(run_dirs)
    if len(set(names)) != len(names):
        raise KecompressError("two runs have the same label: give every run its own --label")
    directories = [RunDirectory(run_dir) for run_dir in run_dirs]
    own_chart = directories[0].chart_file
    out = out or (own_chart if len(run_dirs) == 1 else Path(RunDirectory.CHART))
    if out.is_dir() or out.suffix.lower() != ".png":
        raise KecompressError(f"--out {out} is not a .png file path: the chart is a PNG, e.g. --out chart.png")
    # A run's own chart is redrawn freely; any other existing file may be the user's.
    if out.exists() and not force and not (len(run_dirs) == 1 and out == own_chart):
        raise KecompressError(f"{out} exists: pass --force to replace it, or choose another --out")
    runs = {name: directory.read_metrics() for name, directory in zip(names, directories)}
    for name, directory in zip(names, directories):
        title = directory.title()
        console.print(generations_table(runs[name], title=f"{name}: {title}" if title else name))
        finetune = directory.read_finetune()
        if finetune:
            console.print(finetune_line(finetune))
    plot_generations(runs, out, title=directories[0].title() if len(run_dirs) == 1 else None)
    console.print(f"chart: {out}")


def _short_names(paths: tuple[Path, ...]) -> list[str]:
    """The directory names, or the whole paths where two names are the same."""
    names = [path.resolve().name for path in paths]
    return names if len(set(names)) == len(names) else [str(path) for path in paths]


def _dense_and_fit(source: str, split_method: str, rate: float, align: int, grouped: str, num_classes, image_size,
                   trust_model_file):
    """The dense network, its slim fit, the input shape and the split: from a finished run or an untrained model."""
    run_dir = RunDirectory(source)
    if run_dir.is_run():
        dense, the_split, config = run_dir.load(trust_file=trust_model_file)
        input_shape = (3, image_size or config.image_size, image_size or config.image_size)
        output_features(dense, torch.zeros(1, *input_shape))  # a clear error at a size the model does not take
        if config.split == "edge-popup":  # the sparse network edge-popup found: the dense one, masked
            return dense, fit_network(dense, the_split, fit_batchnorm="inherited").eval(), input_shape, the_split
        if the_split.method != "kels":
            slice_fit(dense, the_split)  # raises the explanation: a WELS fit is sparse, not slim
        dense_for_fit = None if config.arch else run_dir.build_source(config, trust_model_file)
        fit = load_fit(run_dir.fit_file, dense=dense_for_fit)
        return dense, fit, input_shape, the_split
    size = image_size or 224
    dense = resolve_model(source, num_classes or 1000, trust_file=trust_model_file, image_size=size).eval()
    input_shape = (3, size, size)
    example = torch.zeros(1, *input_shape)
    output_features(dense, example)  # a clear error when the model does not take this input
    the_split = make_split(dense, split_method, rate, example_inputs=example, align=align, grouped=grouped)
    return dense, slice_fit(dense, the_split, example_inputs=example), input_shape, the_split


def _model_options(command):
    """The options that choose the network when SOURCE is not a finished run."""
    for option in reversed([
        click.option("--split", "split_method", type=click.Choice(METHODS), default="kels",
                     help="split of an untrained model (a run directory has its own)"),
        click.option("--rate", type=RATE, default=0.5, help="split rate in (0, 1] of an untrained model"),
        click.option("--align", type=ALIGN, default=1, metavar="N", help=ALIGN_HELP + " (an untrained model)"),
        click.option("--grouped", type=click.Choice(GROUPED), default="whole-groups",
                     help=GROUPED_HELP + " (an untrained model)"),
        click.option("--num-classes", type=POSITIVE, default=None,
                     help="outputs of an architecture built by name [default: 1000]"),
        click.option("--input-size", "image_size", type=IMAGE_SIZE, default=None,
                     help="input height and width [default: the run's, or 224]"),
        click.option("--trust-model-file", is_flag=True, help=TRUST_HELP),
    ]):
        command = option(command)
    return command


def _export_options(command):
    """The options of how the networks are exported and quantised, shared by ``export`` and ``bench``."""
    for option in reversed([
        click.option("--exporter", type=click.Choice(EXPORTERS), default=DEFAULT_EXPORTER,
                     help="torch's ONNX exporter: dynamo (torch's recommended one), or the deprecated TorchScript one"),
        click.option("--int8", is_flag=True,
                     help="also static INT8 networks (onnxruntime, QDQ, per-channel), calibrated on training images"),
        click.option("--calibration-data", type=click.Path(path_type=Path), default=None,
                     help="ImageFolder directory of INT8 calibration images [default: a run's own training data, "
                          "else the bundled digits]"),
        click.option("--calibration-images", type=POSITIVE, default=CALIBRATION_IMAGES,
                     help="the most images INT8 is calibrated on (a seeded sample)"),
        click.option("--int8-keep-fp32", "keep_fp32", metavar="KIND,...", default=None,
                     help=f"--int8: the kinds of convolutions left in fp32 ({', '.join(CONV_KINDS)}; none), written "
                          f"however fast [default: timed here; {', '.join(LOSING_KINDS)} are kept in fp32 one by one "
                          "while INT8 runs slower than fp32, and an INT8 network that stays slower is not written]"),
    ]):
        command = option(command)
    return command


@app.command()
@click.argument("source")
@click.option("--onnx", "onnx_format", is_flag=True, help="write ONNX files (the one format for now)")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="directory for dense.onnx and fit.onnx [default: RUN_DIR/onnx, or ./onnx]")
@click.option("--opset", type=click.IntRange(MIN_OPSET, MAX_OPSET), default=None,
              help=f"ONNX opset [default: {LOWEST_OPSET['dynamo']} (dynamo), {LOWEST_OPSET['torchscript']} (torchscript)]")
@click.option("--batch-size", type=POSITIVE, default=1, help="batch size of the exported graph")
@click.option("--dynamic-batch", is_flag=True, help="leave the batch dimension free")
@click.option("--force", is_flag=True, help="replace files of the same names already in --out")
@_export_options
@click.option("--max-accuracy-drop", type=click.FloatRange(0, 100), default=MAX_ACCURACY_DROP,
              help="--int8 of a run: refuse when the INT8 fit loses more top-1 accuracy (points) on the run's "
                   "validation data")
@_model_options
def export(source, onnx_format, out, opset, batch_size, dynamic_batch, force, exporter, int8, calibration_data,
           calibration_images, max_accuracy_drop, keep_fp32, split_method, rate, align, grouped, num_classes, image_size,
           trust_model_file):
    """Export the dense and the fit network of SOURCE to ONNX and check both in onnxruntime.

    SOURCE is a finished run directory, a torchvision architecture name, timm:NAME, or a .pt model file.
    With --int8 also dense.int8.onnx and fit.int8.onnx, each only if it runs at least as fast as its fp32
    network on this machine (timed here; see --int8-keep-fp32); of a run, the INT8 fit's accuracy is checked first.
    """
    _refuse_torchrun("export")
    if not onnx_format:
        raise KecompressError("choose an export format: pass --onnx")
    keep_fp32 = _checked_keep_fp32(keep_fp32, int8)
    out = out or (RunDirectory(source).onnx_dir if RunDirectory(source).is_run() else Path(RunDirectory.ONNX))
    if out.exists() and not out.is_dir():
        raise KecompressError(f"--out {out} is a file: pass a directory path")
    existing = [name for name in PAIR_FILES + (INT8_PAIR_FILES if int8 else ()) if (out / name).exists()]
    if existing and not force:
        raise KecompressError(f"{out} already holds {' and '.join(existing)}: pass --force to replace them, "
                              "or choose another --out")
    dense, fit, input_shape, the_split = _dense_and_fit(source, split_method, rate, align, grouped, num_classes, image_size,
                                                        trust_model_file)
    console.print(describe_split(the_split))
    calibration, validation = _int8_data(source, calibration_data, input_shape) if int8 else (None, None)
    with staged_directory(out) as staging:  # every file appears only once all are written and checked
        rows = export_pair(dense, fit, staging, input_shape, batch_size, opset, dynamic_batch, exporter=exporter)
        quantized = quantize_pair(staging, calibration_subset(calibration, calibration_images), validation,
                                  max_accuracy_drop, keep_fp32) if int8 else None
    for row in rows:
        row["path"] = str(out / Path(row["path"]).name)
    console.print(export_table(rows))
    if quantized:
        for name, speed in zip(INT8_PAIR_FILES, quantized.speeds):
            if not speed.written:  # an INT8 file of an earlier export (--force) does not belong to these networks
                (out / name).unlink(missing_ok=True)
            console.print(speed.describe(name))
        files = ", ".join(f"{out / path.name} ({(out / path.name).stat().st_size / 2**20:.1f} MiB)"
                          for path in quantized.paths) or "no INT8 file written"
        accuracy = (f"fit top-1 on {len(validation)} validation images: fp32 {quantized.fit_fp32_accuracy:.2%}, "
                    f"INT8 {quantized.fit_int8_accuracy:.2%}" if quantized.fit_fp32_accuracy is not None
                    else "INT8 fit not written: its accuracy not checked" if validation is not None
                    else "no validation data: INT8 accuracy not checked (export a run directory to check it)")
        console.print(f"INT8 (QDQ, per-channel, calibrated on {min(calibration_images, len(calibration))} images): "
                      f"{files}; {accuracy}; {describe_cpu_flags(cpu_instruction_sets())}")


def _checked_keep_fp32(keep_fp32: str | None, int8: bool) -> tuple[str, ...] | None:
    """--int8-keep-fp32's kinds, checked; None when not given."""
    if keep_fp32 is None:
        return None
    if not int8:
        raise KecompressError("--int8-keep-fp32 chooses what INT8 leaves in fp32: pass --int8 too, or drop it")
    return check_keep_fp32(keep_fp32)


def _int8_data(source: str, calibration_data: Path | None, input_shape):
    """INT8 calibration images and, for a run, its validation set: from --calibration-data, else the
    run's own training data, else the bundled digits (with a warning)."""
    size = input_shape[-1]
    run_dir = RunDirectory(source)
    calibration = validation = None
    if run_dir.is_run():
        train, validation, _ = experiment.load_data(replace(run_dir.read_config(), image_size=size))
        calibration = without_augmentation(train, validation)
    if calibration_data is not None:
        if not calibration_data.is_dir():
            raise KecompressError(f"--calibration-data {calibration_data} is not a directory: pass an ImageFolder, "
                                  "one subdirectory of images per class")
        calibration = without_augmentation(*image_folder_datasets(calibration_data, size)[:2])
    if calibration is None:
        print("kecompress: warning: no --calibration-data: INT8 is calibrated on the bundled digits, "
              "unlike the network's own inputs", file=sys.stderr)
        calibration = demo_datasets(size)[0]
    return calibration, validation


@app.command()
@click.argument("source")
@click.option("--batch-size", "batch_sizes", type=POSITIVE, multiple=True, default=(1,),
              help="batch size to time; repeat for several")
@click.option("--runtime", "runtimes", type=click.Choice(RUNTIMES), multiple=True,
              default=RUNTIMES, help="runtime to time; repeat for several")
@click.option("--threads", type=POSITIVE, default=2, help="CPU threads each runtime may use")
@click.option("--warmup", type=click.IntRange(0), default=10, help="untimed runs of each network first")
@click.option("--runs", type=POSITIVE, default=50, help="timed runs of each network")
@click.option("--clock", type=click.Choice(list(CLOCKS)), default="wall",
              help="wall: elapsed time; thread (with --threads 1): the running thread's CPU time, which leaves "
                   "out the time other processes take the core away")
@click.option("--json", "as_json", is_flag=True, help="print the measurements as JSON")
@_export_options
@_model_options
def bench(source, batch_sizes, runtimes, threads, warmup, runs, clock, as_json, exporter, int8, calibration_data,
          calibration_images, keep_fp32, split_method, rate, align, grouped, num_classes, image_size, trust_model_file):
    """Measure dense and fit latency of SOURCE on the CPU, interleaved in one process.

    SOURCE is a finished run directory, a torchvision architecture name, timm:NAME, or a .pt model file.
    Prints medians, 90th percentiles, the speedup, the MAC ratio and the efficiency; with --int8
    also the latency in onnxruntime of the INT8 networks export --int8 writes (the kinds it keeps in
    fp32, or that no INT8 network beats fp32) and the CPU's INT8 instruction sets.
    """
    _refuse_torchrun("bench")
    keep_fp32 = _checked_keep_fp32(keep_fp32, int8)
    dense, fit, input_shape, the_split = _dense_and_fit(source, split_method, rate, align, grouped, num_classes, image_size,
                                                        trust_model_file)
    calibration = _int8_data(source, calibration_data, input_shape)[0] if int8 else None
    result = measure_latency(dense, fit, input_shape, batch_sizes, runtimes, threads, warmup, runs, exporter=exporter,
                             int8_calibration=calibration, calibration_images=calibration_images, clock=clock,
                             int8_keep_fp32=keep_fp32)
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=2))
    else:
        console.print(describe_split(the_split))
        console.print(latency_table(result, title=f"{source}: dense vs fit"))
        for row in result.results:
            for line in row.int8.describe(row.batch_size, row.onnxruntime) if row.int8 else ():
                console.print(line)


@app.command()
@click.argument("source")
@click.option("--json", "as_json", is_flag=True, help="print it as JSON")
@click.option("--select", type=click.Choice(SELECTIONS), default="first",
              help="which channels the split of an untrained model keeps (a run directory has its own)")
@click.option("--widths", type=click.Choice(WIDTHS), default="uniform",
              help="how many per group, for an untrained model: uniform, or global to --fit-macs")
@click.option("--fit-macs", type=FRACTION, default=None, metavar="F", help="--widths global: the fit's share of the MACs")
@_model_options
def info(source, as_json, select, widths, fit_macs, split_method, rate, align, grouped, num_classes, image_size,
         trust_model_file):
    """What a split does before any training: kept channels per layer, coupled groups, parameters and
    MACs dense vs fit, the fit fraction against rate²; for a run, also its configuration and last generation.

    SOURCE is a run directory (finished or not), a torchvision architecture name, timm:NAME, or a .pt model file.
    """
    run_dir = RunDirectory(source)
    if run_dir.is_run():
        config = run_dir.read_config()
        dense, the_split = run_dir.build_dense(config, trust_model_file), run_dir.read_split()
        size = image_size or config.image_size
        output_features(dense, torch.zeros(1, 3, size, size))  # a clear error at a size the model does not take
        if the_split.method in EDGE_POPUP_METHODS:  # unfinished: the split its scores choose at the last checkpoint
            dense, the_split = _edge_popup_checkpoint(run_dir, config, dense, torch.zeros(1, 3, size, size))
        records = run_dir.read_metrics() if run_dir.metrics_file.is_file() else []
        run = {"run": run_dir.title() or str(source), "generations": f"{len(records)} of {config.training.generations}"}
        if records:
            last = records[-1]
            run["last generation"] = f"{last.generation}: dense {last.metric} {last.dense:.4f}, fit {last.fit:.4f}"
    else:
        size = image_size or 224
        dense = resolve_model(source, num_classes or 1000, trust_file=trust_model_file, image_size=size).eval()
        output_features(dense, torch.zeros(1, 3, size, size))  # a clear error when the model does not take this input
        if (select, widths) != ("first", "uniform") or fit_macs is not None:
            if split_method != "kels":
                raise KecompressError("--select and --widths choose a KELS fit: drop them or use --split kels")
            the_split = learned_split(dense, rate, select=select, widths=widths, fit_macs=fit_macs, align=align,
                                      example_inputs=torch.zeros(1, 3, size, size))
        else:
            the_split = make_split(dense, split_method, rate, example_inputs=torch.zeros(1, 3, size, size), align=align,
                                   grouped=grouped)
        run = {}
    described = split_info(dense, the_split, (3, size, size), run)
    if as_json:
        click.echo(json.dumps(described.to_json(), indent=2))
    else:
        console.print(info_view(described, f"{source}: the split"))


def _edge_popup_checkpoint(run_dir: RunDirectory, config, dense, example):
    """The random network and the split its scores choose, as the last checkpoint of an unfinished
    edge-popup run holds them (before the first checkpoint: its starting scores)."""
    torch.manual_seed(config.seed)  # the run's starting scores, when no checkpoint holds any yet
    apply_edge_popup(dense, config.split, config.rate, example, config.align)
    state = run_dir.read_checkpoint()
    if state is not None:
        try:
            dense.load_state_dict(state["model"])
        except (KeyError, RuntimeError) as error:
            raise run_dir.unusable_checkpoint(error) from None
    return plain_network(dense, keep_masked=False).eval(), scores_split(dense, config.rate, config.seed)


def _refuse_torchrun(command: str) -> None:
    if distributed.launched():  # every process would write the same files, or time itself against the others
        raise distributed.on_every_rank(KecompressError(
            f"kecompress {command} runs in one process: run it without torchrun"))


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise KecompressError(f"unknown device {name!r}: use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise KecompressError(f"device {name} asked for, but this machine has no CUDA GPU: use --device cpu")
    return device


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``kecompress`` command; returns the exit status.

    Example:
        >>> main(["evolve", "resnet18", "--rate", "2"])  # doctest: +SKIP
        kecompress: split rate must be in (0, 1], got 2.0: e.g. 0.5
        2
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        with _notes_as_lines():
            app.main(args=argv, prog_name="kecompress", standalone_mode=False)
    except RunInterrupted as stop:
        _report(stop, f"{stop}" + (f"; resume with: {_resume_command(argv)}" if stop.saved else ""))
        return 130
    except click.UsageError as error:  # from the command line alone: alike on every rank
        command = error.ctx.command_path if error.ctx else "kecompress"
        _report(distributed.on_every_rank(error), f"{error.format_message()} (see {command} --help)")
        return 2
    except click.exceptions.Abort:  # Ctrl-C outside the training loop: torchrun sends it to every rank
        if distributed.is_main():
            print("kecompress: interrupted", file=sys.stderr)
        return 130
    except KecompressError as error:
        _report(error, str(error))
        return 2
    except OSError as error:  # a full disk, a read-only directory: the previous files are intact
        where = f" ({error.filename})" if error.filename else ""
        _report(error, f"cannot read or write a file{where}: {error.strerror or error}; free disk space "
                "or choose a writable location, then run again (with --resume to continue a run)")
        return 2
    finally:
        distributed.teardown()
    return 0


@contextmanager
def _notes_as_lines():
    """Show every :class:`~kecompress.rundir.RunNote` as one line, ``kecompress: note: ...``, once the
    command has succeeded: a command that fails says one line, its error."""
    notes = []

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, RunNote):
            notes.append(str(message))
        else:
            shown(message, category, filename, lineno, file, line)

    with warnings.catch_warnings():
        warnings.simplefilter("always", RunNote)
        shown, warnings.showwarning = warnings.showwarning, show
        yield
    for note in dict.fromkeys(notes):
        _print_note(note)


def _print_note(note: str) -> None:
    if distributed.is_main():
        print(f"kecompress: note: {note}", file=sys.stderr, flush=True)


def _report(error: BaseException, message: str) -> None:
    """One line on stderr; under torchrun only rank 0 prints an error that every rank raised."""
    if distributed.is_main() or not distributed.raised_on_every_rank(error):
        print(f"kecompress: {message}", file=sys.stderr, flush=True)
    if distributed.raised_on_every_rank(error):
        distributed.barrier()  # nobody exits (torchrun would then kill the rest) before rank 0 has printed


def _resume_command(argv: list[str]) -> str:
    again = ["kecompress", *argv] + ([] if "--resume" in argv else ["--resume"])
    if not distributed.launched():
        return shlex.join(again)
    if os.environ.get("LOCAL_WORLD_SIZE") == os.environ.get("WORLD_SIZE"):  # one machine
        return shlex.join(["torchrun", "--nproc_per_node", os.environ["WORLD_SIZE"], "-m", *again])
    return "the same torchrun command on every machine, running " + shlex.join(again)


if __name__ == "__main__":
    sys.exit(main())
