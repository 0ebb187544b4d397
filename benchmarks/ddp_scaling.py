"""Benchmark: images per second of the evolve training loop, 1 process vs 2 processes (DDP).

Measured side by side in one run, on the same model, data and per-process batch size as
``kecompress evolve`` trains (the bundled digits, ``make_loaders``, a randomly initialised
torchvision model, ``Evolution._train_epoch``: the loop's epoch with its per-step all-reduce):

* 1 process x 1 thread: the baseline;
* 2 processes x 1 thread each: DistributedDataParallel over gloo, as under
  ``torchrun --nproc_per_node 2`` (each with its own half of every epoch's images);
* 1 process x 2 threads: the same two cores used by intra-op threads instead, for reference;
* on CUDA, when there is a GPU: 1 GPU, and all GPUs (NCCL) when there are several.

Every configuration's processes start once (spawned), build their model and data and train a
warm-up epoch; then they wait while the others run. Rounds follow: in each round every
configuration trains one epoch of ``--samples`` images in all, in an order rotated from round
to round, so that drift of the machine reaches all of them alike. Images per second are the
images of the epoch (every rank's) over its wall time, between barriers. Other processes
sharing the CPUs distort CPU figures, so each round also measures how many CPUs other processes
used meanwhile (/proc/stat, less the benchmark's own processes): rounds above ``--quiet-cpus``
are replaced by extra rounds, up to ``--max-rounds`` and ``--time-limit``, and the summary says
how many rounds were clean. Nothing printed is hard-coded: every figure is measured in this
run. Prints a markdown table (median, min-max) and, with ``--json``, the raw figures.

Usage:
    .venv/bin/python benchmarks/ddp_scaling.py [--model resnet18] [--batch-size 32]
        [--samples 512] [--rounds 7] [--precision fp32] [--json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import socket
import statistics
import sys
import time
from pathlib import Path

# Only the standard library at module level: every worker is spawned, and sets its thread count
# (OMP_NUM_THREADS) before it imports torch.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, installed or not

from cpu_load import machine_busy_seconds, own_cpu_seconds  # noqa: E402 (benchmarks/, stdlib only)

SEED = 0
BASELINE = "1 process x 1 thread"


def configurations() -> list[dict]:
    """What to compare: name, processes, threads per process, device."""
    import torch  # in the parent only, to count GPUs; the workers import it themselves

    chosen = [{"name": BASELINE, "processes": 1, "threads": 1, "device": "cpu"},
              {"name": "2 processes x 1 thread", "processes": 2, "threads": 1, "device": "cpu"},
              {"name": "1 process x 2 threads", "processes": 1, "threads": 2, "device": "cpu"}]
    if torch.cuda.is_available():
        gpus = torch.cuda.device_count()
        chosen.append({"name": "1 GPU", "processes": 1, "threads": 1, "device": "cuda"})
        if gpus > 1:
            chosen.append({"name": f"{gpus} GPUs", "processes": gpus, "threads": 1, "device": "cuda"})
    return chosen


class ImageCounter:
    """A reporter that counts the images of an epoch (every rank's: the loop reports the sum)."""

    def __init__(self):
        self.images = 0

    def generation_started(self, *args):
        pass

    def epoch_started(self, *args):
        self.images = 0

    def step_done(self, loss: float, samples: int) -> None:
        self.images += samples

    def generation_done(self, record):
        pass


def worker(config: dict, rank: int, port: int, options: dict, commands, results) -> None:
    """One process of one configuration: set up like ``kecompress evolve``, train a warm-up
    epoch, then one timed epoch per command until told to stop."""
    os.environ["OMP_NUM_THREADS"] = str(config["threads"])
    if config["processes"] > 1:  # what torchrun would set
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                          WORLD_SIZE=str(config["processes"]), LOCAL_WORLD_SIZE=str(config["processes"]))
    import torch
    from torch.utils.data import Subset

    import kecompress
    from kecompress import distributed
    from kecompress.data import demo_datasets, input_shape, make_loaders
    from kecompress.evolution import Evolution, TrainingConfig, make_optimizer
    from kecompress.models import build_model

    torch.set_num_threads(config["threads"])
    distributed.setup(config["device"])
    device = distributed.local_device(torch.device(config["device"]))
    torch.manual_seed(SEED)
    train_set, val_set, classes = demo_datasets(image_size=options["image_size"], seed=SEED)
    train_set = Subset(train_set, range(min(options["samples"], len(train_set))))
    train_loader, val_loader = make_loaders(train_set, val_set, options["batch_size"], SEED,
                                            rank=distributed.rank(), world_size=distributed.world_size())
    model = build_model(options["model"], len(classes))
    example_inputs = torch.zeros(1, *input_shape(val_set))
    split = kecompress.split(model, "kels", 0.5, example_inputs=example_inputs, seed=SEED)
    # Enough epochs in the schedule that no timed epoch runs past its end.
    training = TrainingConfig(generations=1, epochs=options["max_rounds"] + 2, seed=SEED)
    counter = ImageCounter() if distributed.is_main() else None
    evolution = Evolution(model, split, train_loader, val_loader, training, device=device,
                          loss_fn=torch.nn.CrossEntropyLoss(label_smoothing=0.1), example_inputs=example_inputs,
                          reporter=counter, precision=options["precision"],
                          channels_last=options["channels_last"], compile_model=options["compile"])
    optimizer, schedule = make_optimizer(evolution.model, training, len(train_loader))
    evolution._train_epoch(1, 0, optimizer, schedule)  # warm-up (and compilation, if asked)
    results.put({"ready": config["name"], "rank": rank})
    while (epoch := commands.get()) is not None:
        distributed.barrier()
        cpu_before, started = own_cpu_seconds(), time.perf_counter()
        # _train_epoch is private: it is exactly the loop's epoch, without the per-generation
        # evaluation around it; calling it from a benchmark is deliberate.
        evolution._train_epoch(1, epoch, optimizer, schedule)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        distributed.barrier()
        results.put({"name": config["name"], "rank": rank, "seconds": time.perf_counter() - started,
                     "cpu_seconds": own_cpu_seconds() - cpu_before,
                     "images": counter.images if counter else None})
    distributed.teardown()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def measure(options: dict) -> dict:
    """Start every configuration's processes, then run interleaved rounds until enough are clean."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    configs = configurations()
    workers = {}
    for config in configs:
        port = _free_port()
        workers[config["name"]] = []
        for rank in range(config["processes"]):
            commands = context.Queue()
            process = context.Process(target=worker, args=(config, rank, port, options, commands, results))
            process.start()
            workers[config["name"]].append((process, commands))
    for _ in range(sum(config["processes"] for config in configs)):
        results.get(timeout=1800)  # every worker has trained its warm-up epoch

    rounds = {config["name"]: [] for config in configs}
    started = time.monotonic()
    for round_index in range(options["max_rounds"]):
        clean = min(sum(r["clean"] for r in rounds[name]) for name in rounds)
        out_of_time = time.monotonic() - started > options["time_limit"]
        if clean >= options["rounds"] or (out_of_time and round_index >= 3):
            break
        shift = round_index % len(configs)
        for config in configs[shift:] + configs[:shift]:
            busy_before, parent_before, wall_before = machine_busy_seconds(), own_cpu_seconds(), time.perf_counter()
            for _, commands in workers[config["name"]]:
                commands.put(round_index + 1)
            reports = [results.get(timeout=1800) for _ in range(config["processes"])]
            wall = time.perf_counter() - wall_before
            others = None
            if busy_before is not None:
                ours = sum(report["cpu_seconds"] for report in reports) + own_cpu_seconds() - parent_before
                others = max(0.0, (machine_busy_seconds() - busy_before - ours) / wall)
            main_report = next(report for report in reports if report["images"] is not None)
            seconds = max(report["seconds"] for report in reports)
            rounds[config["name"]].append({"images_per_second": main_report["images"] / seconds,
                                           "seconds": seconds, "images": main_report["images"],
                                           "other_cpus": others,
                                           "clean": others is None or others <= options["quiet_cpus"]})
    for processes in workers.values():
        for process, commands in processes:
            commands.put(None)
    for processes in workers.values():
        for process, _ in processes:
            process.join(timeout=60)
    return {"configurations": configs, "rounds": rounds}


def summarise(options: dict, measured: dict) -> dict:
    import torch

    rows = []
    for config in measured["configurations"]:
        rounds = measured["rounds"][config["name"]]
        clean = [r for r in rounds if r["clean"]]
        used = clean if len(clean) >= 3 else rounds  # too few clean rounds: use them all, and say so
        rates = [r["images_per_second"] for r in used]
        others = [r["other_cpus"] for r in used if r["other_cpus"] is not None]
        rows.append({"name": config["name"], "processes": config["processes"], "threads": config["threads"],
                     "device": config["device"], "median": statistics.median(rates), "min": min(rates),
                     "max": max(rates), "rounds_used": len(used), "rounds_clean": len(clean),
                     "rounds_run": len(rounds), "other_cpus": statistics.mean(others) if others else None,
                     "images_per_epoch": used[0]["images"]})
    baselines = {"cpu": next(row["median"] for row in rows if row["name"] == BASELINE),
                 "cuda": next((row["median"] for row in rows if row["name"] == "1 GPU"), None)}
    for row in rows:
        row["speedup"] = row["median"] / baselines[row["device"]]
    return {"machine": {"platform": platform.platform(), "processor": _processor_name(),
                        "cpu_count": os.cpu_count(), "python": platform.python_version(),
                        "torch": torch.__version__,
                        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]},
            "settings": {key: options[key] for key in ("model", "image_size", "batch_size", "samples", "precision",
                                                       "channels_last", "compile", "quiet_cpus")},
            "rows": rows}


def _processor_name() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            return next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def print_table(summary: dict) -> None:
    machine, settings = summary["machine"], summary["settings"]
    print(f"machine: {machine['processor']}, {machine['cpu_count']} CPUs"
          + (f", GPUs: {', '.join(machine['gpus'])}" if machine["gpus"] else ", no GPU")
          + f"; {machine['platform']}, Python {machine['python']}, torch {machine['torch']}")
    print(f"work: {settings['model']} on the digits demo at {settings['image_size']} px, batch "
          f"{settings['batch_size']} per process, {settings['samples']} images an epoch in all, "
          f"{settings['precision']}" + (", channels-last" if settings["channels_last"] else "")
          + (", torch.compile" if settings["compile"] else "")
          + f"; a round is clean when other processes used <= {settings['quiet_cpus']:g} CPUs")
    print()
    print("| configuration | images/s (median) | min-max | speedup | rounds clean / run | other processes' CPUs |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for row in summary["rows"]:
        flag = "" if row["rounds_used"] == row["rounds_clean"] else " (noisy: all rounds used)"
        others = "n/a" if row["other_cpus"] is None else f"{row['other_cpus']:.2f}"
        print(f"| {row['name']} | {row['median']:.1f} | {row['min']:.1f}-{row['max']:.1f} | "
              f"{row['speedup']:.2f}x | {row['rounds_clean']} / {row['rounds_run']}{flag} | {others} |")


def parse_args(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default="resnet18", help="torchvision architecture, random init")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32, help="per process, as kecompress evolve's")
    parser.add_argument("--samples", type=int, default=512, help="training images an epoch, all ranks together")
    parser.add_argument("--rounds", type=int, default=7, help="clean rounds wanted of every configuration")
    parser.add_argument("--max-rounds", type=int, default=0, help="rounds at most (0: three times --rounds)")
    parser.add_argument("--time-limit", type=float, default=600,
                        help="seconds after which no further round starts (at least 3 rounds run)")
    parser.add_argument("--quiet-cpus", type=float, default=0.2,
                        help="a round is clean when other processes used at most this many CPUs meanwhile")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--json", action="store_true", help="print the summary and every round as JSON")
    args = parser.parse_args(argv)
    for name in ("image_size", "batch_size", "samples", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    options = vars(args)
    options["max_rounds"] = max(args.max_rounds or 3 * args.rounds, args.rounds)
    return options


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    measured = measure(options)
    summary = summarise(options, measured)
    if options["json"]:
        print(json.dumps({**summary, "rounds": measured["rounds"]}, indent=2))
    else:
        print_table(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
