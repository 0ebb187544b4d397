"""What the benchmarks share: how busy the machine was, interleaved rounds with the noisy ones
replaced, the machine's description, the digits run the overhead benchmarks train, and tables and reports.

Standard library only at module level: train_overhead.py and ddp_scaling.py import it before
they spawn processes that must start small or set their threads before torch; everything heavy
is imported inside the functions that need it.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

# The reports' hand-written part starts below this line and is kept when a benchmark reruns.
ANALYSIS = "<!-- ANALYSIS: everything below this line is written by hand and kept when the benchmark reruns -->"


# -- how busy the machine was -------------------------------------------------------------------
def own_cpu_seconds() -> float:
    """CPU seconds this process has used so far, user and system.

    Example:
        >>> own_cpu_seconds() > 0
        True
    """
    times = os.times()
    return times.user + times.system


def machine_busy_seconds() -> float | None:
    """CPU seconds the whole machine has been busy so far (Linux /proc/stat), or None elsewhere.

    Example:
        >>> busy = machine_busy_seconds()
        >>> busy is None or busy >= own_cpu_seconds()
        True
    """
    try:
        with open("/proc/stat") as stat:
            fields = [int(value) for value in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")  # user .. steal, not guest (in user)


@dataclass
class Watched:
    """What a measurement returned, and how many CPUs other processes kept busy meanwhile (on
    average; None where the machine's busy time cannot be read)."""

    result: Any
    other_cpus: float | None


def watch(run: Callable[[], Any], helpers_cpu_seconds: Callable[[Any], float] = lambda result: 0.0) -> Watched:
    """Run ``run()`` and measure the CPUs other processes used meanwhile: the machine's busy time
    less this process's and less ``helpers_cpu_seconds(result)`` (the benchmark's own workers').

    Example:
        >>> watched = watch(lambda: sum(range(1000)))
        >>> watched.result, watched.other_cpus is None or watched.other_cpus >= 0
        (499500, True)
    """
    busy, own, started = machine_busy_seconds(), own_cpu_seconds(), time.perf_counter()
    result = run()
    wall = time.perf_counter() - started
    if busy is None:
        return Watched(result, None)
    ours = own_cpu_seconds() - own + helpers_cpu_seconds(result)
    return Watched(result, max(0.0, machine_busy_seconds() - busy - ours) / max(wall, 1e-9))


class Rounds:
    """Interleaved rounds: each measures every side once, in an order rotated from round to round
    (so that drift of the machine reaches all sides alike). Other processes sharing the CPUs make
    the figures noise, so a measurement during which they used more than ``quiet_cpus`` CPUs is
    noisy, and rounds run until every side has ``wanted`` clean ones, ``max_rounds`` have run, or
    ``time_limit`` seconds have passed (3 rounds at least). With ``paired`` a round is clean only
    when all its sides are (the sides are compared round by round). A side with too few clean
    measurements (fewer than 3, or ``wanted``) is judged on all of them, and says so.

    Example:
        >>> rounds = Rounds(["a", "b"], wanted=2, max_rounds=4, time_limit=60, quiet_cpus=float("inf"))
        >>> rounds.run(lambda side, index: Watched(index, 0.0)).results("b")
        [0, 1]
    """

    def __init__(self, sides: Sequence[str], *, wanted: int, max_rounds: int, time_limit: float,
                 quiet_cpus: float, paired: bool = True):
        self.sides, self.wanted, self.max_rounds = list(sides), wanted, max_rounds
        self.time_limit, self.quiet_cpus, self.paired = time_limit, quiet_cpus, paired
        self.rounds: list[dict[str, Watched]] = []

    def run(self, measure: Callable[[str, int], Watched]) -> "Rounds":
        """Measure ``measure(side, round_index)`` round after round until enough are clean."""
        started = time.monotonic()
        while (min(len(self.clean(side)) for side in self.sides) < self.wanted and len(self.rounds) < self.max_rounds
               and (time.monotonic() - started < self.time_limit or len(self.rounds) < 3)):
            shift = len(self.rounds) % len(self.sides)
            order = self.sides[shift:] + self.sides[:shift]
            self.rounds.append({side: measure(side, len(self.rounds)) for side in order})
        return self

    def clean(self, side: str) -> list[Watched]:
        """The measurements of ``side`` no other process disturbed (nor, paired, any of its round's)."""
        quiet = lambda watched: watched.other_cpus is None or watched.other_cpus <= self.quiet_cpus  # noqa: E731
        return [round_[side] for round_ in self.rounds
                if all(map(quiet, round_.values() if self.paired else [round_[side]]))]

    def noisy(self, side: str) -> bool:
        """Whether ``side`` had too few clean measurements, so that all of them are used."""
        return len(self.clean(side)) < min(3, self.wanted)

    def used(self, side: str) -> list[Watched]:
        return [round_[side] for round_ in self.rounds] if self.noisy(side) else self.clean(side)

    def results(self, side: str) -> list:
        """What ``side`` measured in the rounds used, in their order."""
        return [watched.result for watched in self.used(side)]

    def other_cpus(self, *sides: str) -> float | None:
        """The CPUs other processes used on average during the used measurements of ``sides`` (all by default)."""
        values = [watched.other_cpus for side in sides or self.sides for watched in self.used(side)
                  if watched.other_cpus is not None]
        return statistics.fmean(values) if values else None


def timed(run: Callable[[], Any]) -> float:
    """Seconds ``run()`` takes.

    Example:
        >>> timed(lambda: None) < 1
        True
    """
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


# -- the machine ---------------------------------------------------------------------------------
def machine(threads: int | None = None) -> dict:
    """:func:`kecompress.bench.machine_description`, with the 1-minute load average and the GPUs.

    Example:
        >>> machine(2)["threads"]
        2
    """
    import torch

    from kecompress.bench import machine_description

    return {**machine_description(threads), "load_average": round(os.getloadavg()[0], 2),
            "gpus": [torch.cuda.get_device_name(index) for index in range(torch.cuda.device_count())]}


def machine_line(described: dict) -> str:
    """One line naming the machine of :func:`machine`, as every report opens with.

    Example:
        >>> machine_line({"processor": "Xeon", "cpu_count": 2, "system": "Linux", "machine": "x86_64",
        ...               "python": "3.11.7", "torch": "2.5.1", "gpus": []})
        'Xeon (2 CPUs, no GPU, Linux x86_64), Python 3.11.7, torch 2.5.1'
    """
    gpus = ", ".join(described["gpus"]) if described["gpus"] else "no GPU"
    return (f"{described['processor']} ({described['cpu_count']} CPUs, {gpus}, {described['system']} "
            f"{described['machine']}), Python {described['python']}, torch {described['torch']}")


# -- the digits run the overhead benchmarks train -------------------------------------------------
def digits_run(samples: int, epochs: int, **fields):
    """The configuration of ``kecompress evolve`` on the bundled digits with ``fields`` (model,
    batch_size, ...) and one generation of ``epochs`` epochs (enough that no timed epoch runs past
    the end of the schedule, which every timed epoch steps), and its data, the training set cut to
    its first ``samples`` images (0: all) to keep an epoch short: the arguments of
    :func:`kecompress.experiment.build`.

    Example:
        >>> config, (train, val, classes) = digits_run(64, epochs=3, model="resnet18")
        >>> len(train), config.training.epochs
        (64, 3)
    """
    from torch.utils.data import Subset

    from kecompress import experiment
    from kecompress.config import RunConfig, TrainingConfig

    config = RunConfig(**fields, training=TrainingConfig(generations=1, epochs=epochs))
    train, val, classes = experiment.load_data(config)
    return config, ((Subset(train, range(min(samples, len(train)))) if samples else train), val, classes)


# -- command lines and reports -------------------------------------------------------------------
def at_least(least: float, kind: type = int) -> Callable[[str], Any]:
    """An argparse ``type``: a number of ``kind`` no less than ``least`` (one-line error otherwise).

    Example:
        >>> at_least(1)("3")
        3
    """
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind.__name__}") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"must be at least {least}, got {text}")
        return value
    return parse


def rounds_parser(description: str, *, samples: int, rounds: int, time_limit: float,
                  quiet_cpus: float) -> argparse.ArgumentParser:
    """The options of a benchmark that times epochs of the digits run in :class:`Rounds`.

    Example:
        >>> options = parse_rounds(rounds_parser("demo", samples=64, rounds=5, time_limit=60, quiet_cpus=0.1), [])
        >>> options["max_rounds"], options["model"]
        (10, 'resnet18')
    """
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default="resnet18", help="torchvision architecture, random init")
    parser.add_argument("--image-size", type=at_least(1), default=32)
    parser.add_argument("--batch-size", type=at_least(1), default=32, help="per process, as kecompress evolve's")
    parser.add_argument("--samples", type=at_least(0), default=samples,
                        help="train on the first N training images only (0: all) to keep an epoch short")
    parser.add_argument("--rounds", type=at_least(1), default=rounds, help="clean rounds wanted of every side")
    parser.add_argument("--max-rounds", type=at_least(0), default=0,
                        help="rounds to run at most while looking for --rounds clean ones (0: twice --rounds)")
    parser.add_argument("--time-limit", type=at_least(0, float), default=time_limit,
                        help="seconds after which no further round starts (at least 3 rounds run)")
    parser.add_argument("--quiet-cpus", type=at_least(0, float), default=quiet_cpus,
                        help="a round is clean when other processes used at most this many CPUs meanwhile")
    parser.add_argument("--json", action="store_true", help="print the results, and every round, as JSON")
    return parser


def parse_rounds(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> dict:
    """The options :func:`rounds_parser` reads, as a dict, with --max-rounds filled in."""
    options = vars(parser.parse_args(argv))
    options["max_rounds"] = max(options["max_rounds"] or 2 * options["rounds"], options["rounds"])
    return options


def add_small_data_options(parser: argparse.ArgumentParser) -> None:
    """The options of a benchmark that trains on a small data set: the data, the architecture and
    the images per class.

    Example:
        >>> parser = argparse.ArgumentParser()
        >>> add_small_data_options(parser)
        >>> parser.parse_args([]).per_class
        20
    """
    from kecompress.augment import AUGMENTATIONS

    parser.add_argument("--data", default=None, help="ImageFolder directory (default: the bundled digits)")
    parser.add_argument("--arch", default="resnet18", help="torchvision architecture")
    parser.add_argument("--augment", choices=AUGMENTATIONS, default=None,
                        help="augmentation of --data (default: as kecompress evolve chooses from the image size)")
    parser.add_argument("--per-class", type=at_least(0), default=20, help="training images per class; 0: all")
    parser.add_argument("--test-fraction", type=float, default=0.5,
                        help="held-out test fraction of each class (a folder with val/ uses val/)")


def add_training_options(parser: argparse.ArgumentParser) -> None:
    """The training options of ``kecompress evolve`` a benchmark passes on (its defaults), the
    device, and how many jobs run side by side.

    Example:
        >>> parser = argparse.ArgumentParser()
        >>> add_training_options(parser)
        >>> parser.parse_args(["--lr", "0.05"]).lr
        0.05
    """
    from kecompress.config import RunConfig, TrainingConfig

    parser.add_argument("--lr", type=float, default=TrainingConfig.lr, help="SGD learning rate")
    parser.add_argument("--weight-decay", type=float, default=TrainingConfig.weight_decay, help="SGD weight decay")
    parser.add_argument("--warmup-epochs", type=int, default=TrainingConfig.warmup_epochs,
                        help="warm-up epochs of every generation")
    parser.add_argument("--batch-size", type=at_least(1), default=RunConfig.batch_size, help="batch size")
    parser.add_argument("--label-smoothing", type=float, default=RunConfig.label_smoothing, help="label smoothing")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--workers", type=at_least(1), default=None,
                        help="jobs run side by side (default: one per CPU core, one on CUDA)")


def settings_digest(settings: dict) -> str:
    """A short name for a job's settings: finished jobs are kept in files named by it.

    Example:
        >>> settings_digest({"a": 1, "b": 2}) == settings_digest({"b": 2, "a": 1})
        True
    """
    import hashlib
    import json

    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]


def job_settings(args: argparse.Namespace, skipped: Sequence[str], image_size: int, job_format: int) -> dict:
    """What makes a benchmark's job the same job (and names its file): every option but those
    ``skipped`` (where and how many run), the data resolved, its augmentation, the threads a job
    gets and the versions.

    Example:
        >>> args = argparse.Namespace(data=None, augment=None, workers=2, device="cpu", seeds=[0])
        >>> sorted(job_settings(args, ["seeds", "workers"], 32, job_format=1))[:4]
        ['augment', 'data', 'device', 'image_size']
    """
    import torch

    import kecompress
    from kecompress.augment import default_augmentation

    cores = os.cpu_count() or 1
    settings = {key: value for key, value in vars(args).items() if key not in skipped}
    settings.update(data=str(Path(args.data).resolve()) if args.data else None, image_size=image_size,
                    augment=(args.augment or default_augmentation(image_size)) if args.data else None,
                    # the cores shared out, no more than OMP_NUM_THREADS allows: OpenMP threads that
                    # outnumber the free cores wait for each other, many times slower
                    threads=max(1, min(cores // args.workers, torch.get_num_threads())) if args.device == "cpu"
                    else cores,
                    kecompress=kecompress.__version__, torch=torch.__version__, job_format=job_format)
    return settings


def run_script(name: str, main: Callable[[], int]) -> int:
    """``main()``'s exit status; a :class:`~kecompress.KecompressError` (a bad setting, model or
    data) ends it in one line naming the script, with status 2, as the command line does.

    Example:
        >>> run_script("demo", lambda: 0)
        0
    """
    try:
        return main()
    except Exception as error:
        from kecompress.errors import KecompressError  # only now: some scripts must start without torch

        if not isinstance(error, KecompressError):
            raise
        print(f"{name}: {error}", file=sys.stderr)
        return 2


def rich_table(title: str, header: Sequence[str], rows: Sequence[Sequence[str]]):
    """A rich table, the first column left-aligned and the others right-aligned.

    Example:
        >>> rich_table("t", ["a", "b"], [["x", "1"]]).row_count
        1
    """
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for index, column in enumerate(header):
        table.add_column(column, justify="left" if index == 0 else "right")
    for row in rows:
        table.add_row(*row)
    return table


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """The lines of a markdown table (the first column left-aligned), and a blank line.

    Example:
        >>> markdown_table(["a", "b"], [["x", "1"]])
        ['| a | b |', '|---|---:|', '| x | 1 |', '']
    """
    return (["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
            + ["| " + " | ".join(row) + " |" for row in rows] + [""])


def write_report(path: Path, lines: Sequence[str]) -> None:
    """Write ``lines`` to ``path``, then the :data:`ANALYSIS` marker and what was written by hand
    below it in the file before.

    Example:
        >>> # write_report(Path("docs/results.md"), ["# Results", ""])
    """
    before = path.read_text() if path.exists() else ""
    kept = before.split(ANALYSIS, 1)[1] if ANALYSIS in before else "\n"
    path.write_text("\n".join([*lines, ANALYSIS]) + kept)


# -- statistics over seeds -----------------------------------------------------------------------
def mean_std(values: list[float], decimals: int = 1) -> str:
    """Fractions as percent, mean ± standard deviation over the seeds.

    Example:
        >>> mean_std([0.5, 0.7]), mean_std([0.9, 0.96], decimals=2)
        ('60.0 ± 14.1', '93.00 ± 4.24')
    """
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.fmean(values):.{decimals}f} ± {100 * spread:.{decimals}f}"


def paired(values: list[float], baseline: list[float]) -> tuple[str, str]:
    """The paired difference in points (mean ± std, each seed's) and whether it is beyond two standard errors.

    Example:
        >>> paired([0.6, 0.7, 0.8], [0.5, 0.55, 0.7])
        ('+11.7 ± 2.9 (+10.0, +15.0, +10.0)', 'better')
    """
    differences = [100 * (value - base) for value, base in zip(values, baseline)]
    mean = statistics.fmean(differences)
    spread = statistics.stdev(differences) if len(differences) > 1 else math.inf
    beyond = abs(mean) > 2 * spread / math.sqrt(len(differences))
    text = f"{mean:+.1f} ± {spread:.1f} ({', '.join(f'{d:+.1f}' for d in differences)})"
    return text, ("better" if mean > 0 else "worse") if beyond else "within noise"

