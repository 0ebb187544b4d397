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
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import click
import torch
from rich.console import Console

from . import __version__
from . import data as datasets
from . import distributed, rundir
from .errors import KecompressError
from .bench import latency_table, measure_latency
from .charts import metric_name, plot_generations
from .export import export_pair, export_table
from .files import remove_stale_temporaries
from .evolution import FIT_BATCHNORM, Evolution, RunInterrupted, TrainingConfig
from .models import output_features, resolve_model
from .acceleration import PRECISIONS, MixedPrecision, check_channels_last, check_compile
from .report import RichReporter, generations_table
from .slim import slice_fit
from .split import Split, check_rate, split as make_split

console = Console()

MODEL_HELP = "a torchvision architecture name (e.g. resnet18) or a .pt file holding a whole model"
TRUST_HELP = "load a model file with full pickle, which can run code from it: only for files you trust"

# Settings that make two runs the same run; the rest (device, precision, target...) may change on
# resume. The number of processes is one: it multiplies the images of a step.
_RUN_IDENTITY = ("model", "arch", "num_classes", "classes", "split", "rate", "seed", "data",
                 "image_size", "val_fraction", "batch_size", "label_smoothing", "fit_batchnorm", "training",
                 "world_size")
# For run directories written before a setting existed.
_IDENTITY_DEFAULTS = {"world_size": 1, "fit_batchnorm": "inherited"}


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(__version__, prog_name="kecompress")
def app():
    """Knowledge Evolution for PyTorch: split, evolve, slice, export, measure."""


@app.command()
@click.argument("model")
@click.option("--split", "split_method", type=click.Choice(["kels", "wels"]), default="kels",
              help="kels (slim fit) or wels (sparse fit)")
@click.option("--rate", type=float, default=0.5, help="split rate in (0, 1]")
@click.option("--generations", type=int, default=5, help="number of generations")
@click.option("--epochs", type=int, default=10, help="epochs per generation")
@click.option("--data", type=click.Path(path_type=Path), default=None,
              help="ImageFolder directory (train/ and val/, or class folders); absent: the bundled 8x8 digits")
@click.option("--num-classes", type=int, default=None,
              help="classes of a torchvision architecture (default: inferred from the data)")
@click.option("--image-size", type=int, default=None, help="input size (default 224, 32 for the demo data)")
@click.option("--val-fraction", type=float, default=0.2, help="held-out fraction when --data has no val/")
@click.option("--batch-size", type=int, default=32, help="batch size (of each process under torchrun)")
@click.option("--lr", type=float, default=0.1, help="SGD learning rate (momentum 0.9, cosine schedule)")
@click.option("--weight-decay", type=float, default=1e-4, help="SGD weight decay")
@click.option("--warmup-epochs", type=int, default=0, help="linear warm-up epochs at the start of each generation")
@click.option("--label-smoothing", type=float, default=0.1, help="label smoothing of the cross-entropy loss")
@click.option("--seed", type=int, default=0, help="seed of the split, the data order and the resets")
@click.option("--out", type=click.Path(path_type=Path), default=Path("runs/ke"),
              help="run directory to create (or to resume)")
@click.option("--resume", is_flag=True, help="continue the run in --out from its last checkpoint")
@click.option("--target-accuracy", type=float, default=None,
              help="stop once the fit hypothesis reaches this validation accuracy (a fraction in (0, 1])")
@click.option("--fit-batchnorm", type=click.Choice(FIT_BATCHNORM), default="re-estimated",
              help="the fit network's BatchNorm statistics: re-estimated on the training images for the fit "
                   "network alone, or inherited from the dense network (KE's paper)")
@click.option("--device", default="auto", help="cpu, cuda, cuda:N or auto")
@click.option("--precision", type=click.Choice(list(PRECISIONS)), default="fp32",
              help="fp32, or mixed precision: bf16 or fp16 (with a gradient scaler) under autocast")
@click.option("--channels-last", is_flag=True,
              help="channels-last memory format for convolutional networks (helps GPUs with bf16/fp16)")
@click.option("--compile", "compile_model", is_flag=True,
              help="train through torch.compile: slow to start, then faster (needs g++ on the CPU, triton on a GPU)")
@click.option("--trust-model-file", is_flag=True, help=TRUST_HELP)
def evolve(model, split_method, rate, generations, epochs, data, num_classes, image_size, val_fraction,
           batch_size, lr, weight_decay, warmup_epochs, label_smoothing, seed, out, resume, target_accuracy,
           fit_batchnorm, device, precision, channels_last, compile_model, trust_model_file):
    """Train MODEL for several generations of Knowledge Evolution.

    Under torchrun (e.g. torchrun --nproc_per_node 2 -m kecompress evolve MODEL ...) it trains
    with DistributedDataParallel, one process per GPU or per group of CPU cores: every rank
    trains on its part of the data, rank 0 writes the run directory and prints.
    """
    distributed.setup(device)  # first: errors found on one rank below are then shared with all
    if not distributed.is_main():  # rank 0 shows each warning once; errors still show
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)
    # Every check that one rank may fail alone (rank 0 alone sees --out, say) ends every rank alike;
    # the command line and --out first, before the data set is read.
    with distributed.fail_together(KecompressError, OSError):
        rate = check_rate(rate)
        config = TrainingConfig(generations=generations, epochs=epochs, lr=lr, weight_decay=weight_decay,
                                warmup_epochs=warmup_epochs, seed=seed, target=target_accuracy)
        _check_numbers(batch_size=batch_size, label_smoothing=label_smoothing, val_fraction=val_fraction,
                       target_accuracy=target_accuracy, image_size=image_size, num_classes=num_classes)
        torch_device = distributed.local_device(_device(device))
        MixedPrecision(precision, torch_device)
        if compile_model:
            check_compile(torch_device)
        if distributed.is_main():
            _check_out_dir(out, resume)

    with distributed.fail_together(KecompressError, OSError):
        torch.manual_seed(seed)
        image_size = image_size or (224 if data else 32)
        train_set, val_set, classes = datasets.load_datasets(str(data) if data else None, image_size,
                                                             val_fraction, seed)
        net = resolve_model(model, num_classes or len(classes), trust_file=trust_model_file)
        example_inputs = torch.zeros(1, *datasets.input_shape(val_set))
        outputs = output_features(net, example_inputs)
        if outputs != len(classes):
            raise KecompressError(f"the model has {outputs} outputs but the data has {len(classes)} classes: "
                                  f"pass --num-classes {len(classes)} or a model built for this data")
        if channels_last:
            check_channels_last(net)
        run_config = {
            "model": model, "arch": None if _is_file(model) else model, "num_classes": len(classes),
            "classes": classes, "split": split_method, "rate": rate, "seed": seed,
            "data": str(data.resolve()) if data else None, "image_size": image_size,
            "val_fraction": val_fraction, "batch_size": batch_size, "label_smoothing": label_smoothing,
            "fit_batchnorm": fit_batchnorm, "training": {k: v for k, v in asdict(config).items() if k != "target"},
            "world_size": distributed.world_size(), "trust_model_file": trust_model_file,
        }
        if resume and distributed.is_main():
            _check_same_run(out, run_config)

    def split_on_main() -> Split:  # rank 0 owns the run directory; the other ranks get its split
        if resume:
            remove_stale_temporaries(out)
            return Split.load(out / rundir.SPLIT)
        new_split = make_split(net, split_method, rate, example_inputs=example_inputs, seed=seed)
        rundir.start_run(out, run_config, new_split, Path(model) if _is_file(model) else None)
        return new_split

    the_split = distributed.run_on_main(split_on_main)
    with distributed.fail_together(KecompressError):
        the_split.check_matches(net)
        train_loader, val_loader = datasets.make_loaders(train_set, val_set, batch_size, seed,
                                                         rank=distributed.rank(), world_size=distributed.world_size())
        loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        evolution = Evolution(net, the_split, train_loader, val_loader, config, loss_fn=loss_fn,
                              device=torch_device, example_inputs=example_inputs.to(torch_device), run_dir=out,
                              precision=precision, channels_last=channels_last, compile_model=compile_model,
                              fit_batchnorm=fit_batchnorm)
    processes = (f"; {distributed.world_size()} processes ({torch.distributed.get_backend()})"
                 if distributed.is_distributed() else "")
    _print_on_main(f"[bold]kecompress evolve[/] {model}: {split_method.upper()} split at rate {rate}, "
                   f"fit {the_split.fit_fraction():.1%} of {the_split.total_count():,} split parameters; "
                   f"{len(train_set)} training / {len(val_set)} validation images, {len(classes)} classes; "
                   f"device {torch_device}, {precision}{processes}; run directory {out}")
    progress = RichReporter(config.generations, console=console) if distributed.is_main() else nullcontext()
    with progress as reporter:
        evolution.reporter = reporter
        if resume:
            evolution.resume()
        history = evolution.run()
    # The fit network that was measured (every rank takes part when its statistics are re-estimated).
    fit = evolution.fit_network() if the_split.method == "kels" else None
    if distributed.is_main():
        rundir.save_final(out, net.cpu(), fit and fit.cpu(), the_split, run_config, example_inputs)
        plot_generations({out.name: history}, out / rundir.CHART, title=_run_title(out))
    last = history[-1]
    _print_on_main(f"done: generation {last['generation']}, dense accuracy {last['dense_accuracy']:.2%}, "
                   f"fit accuracy {last['fit_accuracy']:.2%}; metrics in {out / 'metrics.json'} "
                   f"(chart: {out / rundir.CHART}), final models in {out / rundir.DENSE}"
                   + (f" and {out / rundir.FIT}" if the_split.method == "kels" else ""))


def _print_on_main(message: str) -> None:
    if distributed.is_main():
        console.print(message)


def _run_title(run_dir: Path) -> str | None:
    """What a CLI run trained, for titles; None for a directory the Python API wrote."""
    if not (run_dir / rundir.CONFIG).is_file():
        return None
    config = rundir.read_config(run_dir)
    data = Path(config["data"]).name if config.get("data") else "the digits demo"
    return f"{Path(config['model']).name}, {config['split'].upper()} rate {config['rate']}, on {data}"


@app.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help=f"PNG file to write [default: RUN_DIR/{rundir.CHART} for one run, ./{rundir.CHART} for several]")
@click.option("--label", "labels", multiple=True, help="legend label of each run, in order [default: directory names]")
@click.option("--force", is_flag=True, help="replace --out if it exists")
def report(run_dirs, out, labels, force):
    """Print the generations of one or more runs and chart them (dense and fit against generation).

    RUN_DIRS are `kecompress evolve --out` directories, finished or still running.
    """
    if labels and len(labels) != len(run_dirs):
        raise KecompressError(f"{len(labels)} --label for {len(run_dirs)} run directories: "
                              "give one --label per run, in order, or none")
    names = list(labels) or _short_names(run_dirs)
    if len(set(names)) != len(names):
        raise KecompressError("two runs have the same label: give every run its own --label")
    own_chart = run_dirs[0] / rundir.CHART
    out = out or (own_chart if len(run_dirs) == 1 else Path(rundir.CHART))
    if out.is_dir() or out.suffix.lower() != ".png":
        raise KecompressError(f"--out {out} is not a .png file path: the chart is a PNG, e.g. --out chart.png")
    # A run's own chart is redrawn freely; any other existing file may be the user's.
    if out.exists() and not force and not (len(run_dirs) == 1 and out == own_chart):
        raise KecompressError(f"{out} exists: pass --force to replace it, or choose another --out")
    runs = {name: rundir.read_metrics(run_dir) for name, run_dir in zip(names, run_dirs)}
    for name, run_dir in zip(names, run_dirs):
        title = _run_title(run_dir)
        console.print(generations_table(runs[name], metric_name(runs[name]), title=f"{name}: {title}" if title else name))
    plot_generations(runs, out, title=_run_title(run_dirs[0]) if len(run_dirs) == 1 else None)
    console.print(f"chart: {out}")


def _short_names(paths: tuple[Path, ...]) -> list[str]:
    """The directory names, or the whole paths where two names are the same."""
    names = [path.resolve().name for path in paths]
    return names if len(set(names)) == len(names) else [str(path) for path in paths]


def _dense_and_fit(source: str, split_method: str, rate: float, num_classes, image_size, trust_model_file):
    """The dense network, its slim fit and the input shape: from a finished run or an untrained model."""
    if (Path(source) / rundir.CONFIG).is_file():
        dense, the_split, config = rundir.load_run(source, trust_file=trust_model_file)
        input_shape = (3, image_size or config["image_size"], image_size or config["image_size"])
        if the_split.method != "kels":
            slice_fit(dense, the_split)  # raises the explanation: a WELS fit is sparse, not slim
        dense_for_fit = None if config.get("arch") else rundir.build_dense(config, source, trust_model_file)
        fit = rundir.load_fit(Path(source) / rundir.FIT, dense=dense_for_fit)
        return dense, fit, input_shape
    rate = check_rate(rate)
    dense = resolve_model(source, num_classes or 1000, trust_file=trust_model_file).eval()
    size = image_size or 224
    input_shape = (3, size, size)
    example = torch.zeros(1, *input_shape)
    output_features(dense, example)  # a clear error when the model does not take this input
    the_split = make_split(dense, split_method, rate, example_inputs=example)
    return dense, slice_fit(dense, the_split, example_inputs=example), input_shape


def _model_options(command):
    """The options that choose the network when SOURCE is not a finished run."""
    for option in reversed([
        click.option("--split", "split_method", type=click.Choice(["kels", "wels"]), default="kels",
                     help="split of an untrained model (a run directory has its own)"),
        click.option("--rate", type=float, default=0.5, help="split rate in (0, 1] of an untrained model"),
        click.option("--num-classes", type=int, default=None, help="outputs of a torchvision architecture [default: 1000]"),
        click.option("--input-size", "image_size", type=int, default=None,
                     help="input height and width [default: the run's, or 224]"),
        click.option("--trust-model-file", is_flag=True, help=TRUST_HELP),
    ]):
        command = option(command)
    return command


@app.command()
@click.argument("source")
@click.option("--onnx", "onnx_format", is_flag=True, help="write ONNX files (the one format for now)")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="directory for dense.onnx and fit.onnx [default: RUN_DIR/onnx, or ./onnx]")
@click.option("--opset", type=int, default=17, help="ONNX opset, 17 to 20")
@click.option("--batch-size", type=int, default=1, help="batch size of the exported graph")
@click.option("--dynamic-batch", is_flag=True, help="leave the batch dimension free")
@click.option("--force", is_flag=True, help="replace dense.onnx and fit.onnx already in --out")
@_model_options
def export(source, onnx_format, out, opset, batch_size, dynamic_batch, force, split_method, rate,
           num_classes, image_size, trust_model_file):
    """Export the dense and the fit network of SOURCE to ONNX and check both in onnxruntime.

    SOURCE is a finished run directory, a torchvision architecture name, or a .pt model file.
    """
    _refuse_torchrun("export")
    if not onnx_format:
        raise KecompressError("choose an export format: pass --onnx")
    _check_numbers(batch_size=batch_size, input_size=image_size, num_classes=num_classes)
    out = out or (Path(source) / "onnx" if (Path(source) / rundir.CONFIG).is_file() else Path("onnx"))
    if out.exists() and not out.is_dir():
        raise KecompressError(f"--out {out} is a file: pass a directory path")
    existing = [name for name in ("dense.onnx", "fit.onnx") if (out / name).exists()]
    if existing and not force:
        raise KecompressError(f"{out} already holds {' and '.join(existing)}: pass --force to replace them, "
                              "or choose another --out")
    dense, fit, input_shape = _dense_and_fit(source, split_method, rate, num_classes, image_size, trust_model_file)
    rows = export_pair(dense, fit, out, input_shape, batch_size, opset, dynamic_batch)
    console.print(export_table(rows))


@app.command()
@click.argument("source")
@click.option("--batch-size", "batch_sizes", type=int, multiple=True, default=(1,),
              help="batch size to time; repeat for several")
@click.option("--runtime", "runtimes", type=click.Choice(["onnxruntime", "torch"]), multiple=True,
              default=("onnxruntime", "torch"), help="runtime to time; repeat for several")
@click.option("--threads", type=int, default=2, help="CPU threads each runtime may use")
@click.option("--warmup", type=int, default=10, help="untimed runs of each network first")
@click.option("--runs", type=int, default=50, help="timed runs of each network")
@click.option("--json", "as_json", is_flag=True, help="print the measurements as JSON")
@_model_options
def bench(source, batch_sizes, runtimes, threads, warmup, runs, as_json, split_method, rate, num_classes,
          image_size, trust_model_file):
    """Measure dense and fit latency of SOURCE on the CPU, interleaved in one process.

    SOURCE is a finished run directory, a torchvision architecture name, or a .pt model file.
    Prints medians, 90th percentiles, the speedup, the MAC ratio and the efficiency.
    """
    _refuse_torchrun("bench")
    _check_numbers(input_size=image_size, num_classes=num_classes)
    for batch_size in batch_sizes:
        _check_numbers(batch_size=batch_size)
    dense, fit, input_shape = _dense_and_fit(source, split_method, rate, num_classes, image_size, trust_model_file)
    result = measure_latency(dense, fit, input_shape, batch_sizes, runtimes, threads, warmup, runs)
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        console.print(latency_table(result, title=f"{source}: dense vs fit"))


def _refuse_torchrun(command: str) -> None:
    if distributed.launched():  # every process would write the same files, or time itself against the others
        raise distributed.on_every_rank(KecompressError(
            f"kecompress {command} runs in one process: run it without torchrun"))


def _is_file(model: str) -> bool:
    return Path(model).suffix in (".pt", ".pth") or Path(model).exists()


def _check_numbers(**values) -> None:
    rules = {
        "batch_size": (lambda v: v >= 1, "must be at least 1"),
        "label_smoothing": (lambda v: 0 <= v < 1, "must be in [0, 1)"),
        "val_fraction": (lambda v: 0 < v < 1, "must be in (0, 1)"),
        "target_accuracy": (lambda v: v is None or 0 < v <= 1, "must be a fraction in (0, 1], e.g. 0.9"),
        "image_size": (lambda v: v is None or v >= 8, "must be at least 8 pixels"),
        "input_size": (lambda v: v is None or v >= 8, "must be at least 8 pixels"),
        "num_classes": (lambda v: v is None or v >= 1, "must be at least 1"),
    }
    for name, value in values.items():
        check, rule = rules[name]
        if not check(value):
            raise KecompressError(f"--{name.replace('_', '-')} {rule}, got {value}")


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


def _check_out_dir(out: Path, resume: bool) -> None:
    if out.exists() and not out.is_dir():
        raise KecompressError(f"--out {out} is a file: pass a directory path")
    if resume:
        if not (out / rundir.CONFIG).is_file():
            raise KecompressError(f"nothing to resume in {out} (no kecompress run there): run without --resume")
    elif out.is_dir() and any(out.iterdir()):
        what = "holds a kecompress run" if (out / rundir.CONFIG).exists() else "is not empty"
        raise KecompressError(f"--out {out} {what}: pass --resume to continue it, or choose another --out")


def _check_same_run(out: Path, run_config: dict) -> None:
    saved = rundir.read_config(out)
    saved = {key: saved.get(key, _IDENTITY_DEFAULTS.get(key)) for key in _RUN_IDENTITY}
    changed = [key for key in _RUN_IDENTITY if saved[key] != run_config.get(key)]
    if changed == ["world_size"]:
        was, now = saved["world_size"], run_config["world_size"]
        raise KecompressError(f"--out {out} was trained by {was} process{'es' * (was != 1)} and this run has {now}: "
                              "the images of a step (batch size x processes) would change; resume with "
                              + ("torchrun --nproc_per_node " + str(was) if was > 1 else "one process (no torchrun)")
                              + " (processes of all machines together), or choose another --out")
    if changed:
        raise KecompressError(f"--out {out} holds a different run (it differs in {', '.join(changed)}): "
                              "resume with the same settings, or choose another --out")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``kecompress`` command; returns the exit status.

    Example:
        >>> main(["evolve", "resnet18", "--rate", "2"])  # doctest: +SKIP
        kecompress: split rate must be in (0, 1], got 2.0: e.g. 0.5
        2
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
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
