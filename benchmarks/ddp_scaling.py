"""Benchmark: images per second of the evolve training loop, 1 process vs 2 processes (DDP).

Measured side by side in one run, on the same model, data and per-process batch size as
``kecompress evolve`` trains (the bundled digits, ``make_loaders``, a randomly initialised
torchvision model, built by ``kecompress.experiment.build``; ``Evolution.train_epoch``: the loop's
epoch with its per-step all-reduce):

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

import json
import multiprocessing
import os
import socket
import statistics
import sys
import time
from pathlib import Path

# Only the standard library at module level (common.py is too): every worker is spawned, and
# sets its thread count (OMP_NUM_THREADS) before it imports torch.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, installed or not

from common import (Rounds, digits_run, machine, machine_line, markdown_table, own_cpu_seconds,  # noqa: E402
                    parse_rounds, rounds_parser, run_script, watch)

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


def worker(config: dict, rank: int, port: int, options: dict, commands, results) -> None:
    """One process of one configuration: set up like ``kecompress evolve``, train a warm-up
    epoch, then one timed epoch per command until told to stop."""
    os.environ["OMP_NUM_THREADS"] = str(config["threads"])
    if config["processes"] > 1:  # what torchrun would set
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                          WORLD_SIZE=str(config["processes"]), LOCAL_WORLD_SIZE=str(config["processes"]))
    import torch

    from kecompress import Callback, distributed

    class ImageCounter(Callback):
        """Counts the images of an epoch (every rank's: the loop reports their sum)."""

        def on_epoch_start(self, loop, generation: int, epoch: int) -> None:
            self.images = 0

        def on_step_end(self, loop, loss: float, samples: int) -> None:
            self.images += samples

    torch.set_num_threads(config["threads"])
    distributed.setup(config["device"])
    device = distributed.local_device(torch.device(config["device"]))
    counter = ImageCounter()
    loop = build_loop(options, device=device, callbacks=[counter])
    loop.train_epoch(1, 0)  # warm-up (and compilation, if asked)
    results.put({"ready": config["name"], "rank": rank})
    while (epoch := commands.get()) is not None:
        distributed.barrier()
        cpu_before, started = own_cpu_seconds(), time.perf_counter()
        loop.train_epoch(1, epoch)  # the loop's epoch, without the evaluations a generation ends with
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        distributed.barrier()
        results.put({"rank": rank, "seconds": time.perf_counter() - started,
                     "cpu_seconds": own_cpu_seconds() - cpu_before, "images": counter.images})
    distributed.teardown()


def build_loop(options: dict, **build_options):
    """The evolve loop of ``kecompress evolve`` on --samples digits, as --precision etc. ask."""
    from kecompress import experiment

    run = digits_run(options["samples"], options["max_rounds"] + 2, model=options["model"],
                     image_size=options["image_size"], batch_size=options["batch_size"])
    return experiment.build(*run, precision=options["precision"], channels_last=options["channels_last"],
                            compile_model=options["compile"], **build_options)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def measure(options: dict) -> tuple[list[dict], Rounds]:
    """Start every configuration's processes, then run interleaved rounds until enough are clean."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    configs = {config["name"]: config for config in configurations()}
    workers = {name: [] for name in configs}
    for name, config in configs.items():
        port = _free_port()
        for rank in range(config["processes"]):
            commands = context.Queue()
            process = context.Process(target=worker, args=(config, rank, port, options, commands, results))
            process.start()
            workers[name].append((process, commands))
    for _ in range(sum(config["processes"] for config in configs.values())):
        results.get(timeout=1800)  # every worker has trained its warm-up epoch

    def epoch(name: str, round_index: int) -> dict:
        for _, commands in workers[name]:
            commands.put(round_index + 1)
        reports = [results.get(timeout=1800) for _ in workers[name]]
        seconds = max(report["seconds"] for report in reports)
        return {"images_per_second": reports[0]["images"] / seconds, "seconds": seconds,
                "images": reports[0]["images"], "cpu_seconds": sum(report["cpu_seconds"] for report in reports)}

    # Each configuration is judged on its own clean rounds: they are not compared round by round.
    rounds = Rounds(list(configs), wanted=options["rounds"], max_rounds=options["max_rounds"],
                    time_limit=options["time_limit"], quiet_cpus=options["quiet_cpus"], paired=False)
    rounds.run(lambda name, index: watch(lambda: epoch(name, index), lambda result: result["cpu_seconds"]))
    for processes in workers.values():
        for process, commands in processes:
            commands.put(None)
    for processes in workers.values():
        for process, _ in processes:
            process.join(timeout=60)
    return list(configs.values()), rounds


def summarise(options: dict, configs: list[dict], rounds: Rounds) -> dict:
    rows = []
    for config in configs:
        used = rounds.results(config["name"])
        rates = [result["images_per_second"] for result in used]
        rows.append({**config, "median": statistics.median(rates), "min": min(rates), "max": max(rates),
                     "rounds_used": len(used), "rounds_clean": len(rounds.clean(config["name"])),
                     "rounds_run": len(rounds.rounds), "noisy": rounds.noisy(config["name"]),
                     "other_cpus": rounds.other_cpus(config["name"]), "images_per_epoch": used[0]["images"]})
    baselines = {"cpu": next(row["median"] for row in rows if row["name"] == BASELINE),
                 "cuda": next((row["median"] for row in rows if row["name"] == "1 GPU"), None)}
    for row in rows:
        row["speedup"] = row["median"] / baselines[row["device"]]
    return {"machine": machine(), "rows": rows,
            "settings": {key: options[key] for key in ("model", "image_size", "batch_size", "samples", "precision",
                                                       "channels_last", "compile", "quiet_cpus")}}


def print_table(summary: dict) -> None:
    settings = summary["settings"]
    print(f"machine: {machine_line(summary['machine'])}")
    print(f"work: {settings['model']} on the digits demo at {settings['image_size']} px, batch "
          f"{settings['batch_size']} per process, {settings['samples']} images an epoch in all, "
          f"{settings['precision']}" + (", channels-last" if settings["channels_last"] else "")
          + (", torch.compile" if settings["compile"] else "")
          + f"; a round is clean when other processes used <= {settings['quiet_cpus']:g} CPUs")
    print()
    rows = [[row["name"], f"{row['median']:.1f}", f"{row['min']:.1f}-{row['max']:.1f}", f"{row['speedup']:.2f}x",
             f"{row['rounds_clean']} / {row['rounds_run']}" + (" (noisy: all rounds used)" if row["noisy"] else ""),
             "n/a" if row["other_cpus"] is None else f"{row['other_cpus']:.2f}"] for row in summary["rows"]]
    print("\n".join(markdown_table(["configuration", "images/s (median)", "min-max", "speedup",
                                    "rounds clean / run", "other processes' CPUs"], rows)))


def parse_args(argv: list[str] | None = None) -> dict:
    parser = rounds_parser(__doc__.split("\n\n")[0], samples=512, rounds=7, time_limit=600, quiet_cpus=0.2)
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true")
    return parse_rounds(parser, argv)


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    build_loop(options)  # once here, so that a bad model or option ends in one line before any worker starts
    configs, rounds = measure(options)
    summary = summarise(options, configs, rounds)
    if options["json"]:
        every_round = [{name: {**watched.result, "other_cpus": watched.other_cpus} for name, watched in round_.items()}
                       for round_ in rounds.rounds]
        print(json.dumps({**summary, "rounds": every_round}, indent=2))
    else:
        print_table(summary)
    return 0


if __name__ == "__main__":
    sys.exit(run_script("ddp_scaling", main))
