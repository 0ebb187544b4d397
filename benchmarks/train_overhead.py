"""Benchmark: what the Knowledge Evolution loop costs on top of a plain PyTorch training loop.

Measured side by side in one run, on the same model, data, batch size, optimizer and schedule:

1. epoch time of the evolve loop (``Evolution._train_epoch`` with the command line's
   ``RichReporter`` attached) over the epoch time of a textbook PyTorch loop (target <= 1.03);
   the two are interleaved (plain, evolve, plain, evolve, ...) after a warm-up epoch of each,
   and their medians are compared;
2. the reset step (``kecompress.reset_``) as a fraction of one median epoch (target <= 0.01);
3. peak memory (max RSS) of each side, each in its own fresh ``spawn`` child process doing the
   same work (target <= 1.10x).

Nothing printed is hard-coded: every figure is measured in this run. Both loops take turns to
train one model with one optimizer, so that the loop code is the only difference. Other
processes sharing the CPUs make epoch times noisy (with every core in use, a preempted OpenMP
thread stalls the others), so the benchmark reads from /proc/stat how much CPU other processes
used during each epoch: rounds in which they used more than --quiet-cpus are replaced by extra
rounds (up to --max-rounds and --time-limit), and the summary says how many rounds were clean.
The plain epochs of odd and even rounds are also compared with each other, as a noise floor.
``--breakdown`` adds a third interleaved side, the evolve loop without a reporter, to attribute
any overhead; informational rows (target "info") break the costs down further. This is a
benchmark, not a test: it always exits 0.

Usage:
    .venv/bin/python benchmarks/train_overhead.py [--model resnet18] [--batch-size 32]
        [--samples 640] [--rounds 30] [--threads N] [--breakdown] [--json]
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

# Only the standard library at module level: the memory children are spawned before this process
# imports torch, because on Linux a child's ru_maxrss starts from the RSS of the process that
# spawned it (the high-water mark survives fork + exec), so a parent that has already trained a
# network would hide the children's own peaks. Everything heavy is imported inside functions.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, installed or not

from cpu_load import machine_busy_seconds, own_cpu_seconds  # noqa: E402 (benchmarks/, stdlib only)

TARGET_EPOCH_RATIO = 1.03
TARGET_RESET_FRACTION = 0.01
TARGET_MEMORY_RATIO = 1.10
LABEL_SMOOTHING = 0.1  # the command line's default loss: cross-entropy with label smoothing 0.1
SEED = 0


# -- the shared setup ---------------------------------------------------------------------------
def build_setup(options: dict) -> dict:
    """Model, data, loader, loss and training config exactly as ``kecompress evolve`` builds them
    (demo digits data, ``make_loaders``, a randomly initialised torchvision model), with the
    training set cut to its first ``samples`` images to keep an epoch short."""
    import torch
    from torch.utils.data import Subset

    from kecompress.data import demo_datasets, input_shape, make_loaders
    from kecompress.evolution import TrainingConfig
    from kecompress.models import build_model

    torch.set_num_threads(options["threads"])
    torch.manual_seed(SEED)
    train_set, val_set, classes = demo_datasets(image_size=options["image_size"], seed=SEED)
    if options["samples"]:
        train_set = Subset(train_set, range(min(options["samples"], len(train_set))))
    train_loader, val_loader = make_loaders(train_set, val_set, options["batch_size"], SEED)
    model = build_model(options["model"], len(classes))
    example_inputs = torch.zeros(1, *input_shape(val_set))
    # Enough epochs in the schedule that no measured epoch runs past its end.
    config = TrainingConfig(generations=1, epochs=options["epochs_in_schedule"], seed=SEED)
    return {"train_loader": train_loader, "val_loader": val_loader, "model": model, "rate": options["rate"],
            "example_inputs": example_inputs, "config": config, "train_samples": len(train_set),
            "loss_fn": torch.nn.CrossEntropyLoss(label_smoothing=LABEL_SMOOTHING)}


def quiet_reporter(generations: int = 1):
    """The command line's reporter, rendering as it does on a terminal, into /dev/null."""
    from rich.console import Console

    from kecompress.report import RichReporter

    sink = open(os.devnull, "w")
    # force_terminal: rich renders the live progress display (10 refreshes a second) exactly as in
    # a real terminal; a plain file console would skip the rendering and under-count its cost.
    console = Console(file=sink, force_terminal=True, width=120, color_system="truecolor")
    return RichReporter(generations, console=console)


def plain_epoch(model, loader, optimizer, schedule, loss_fn) -> None:
    """The textbook PyTorch training epoch."""
    model.train()
    for inputs, targets in loader:
        optimizer.zero_grad()
        loss = loss_fn(model(inputs), targets)
        loss.backward()
        optimizer.step()
        schedule.step()


def make_evolution(setup: dict, model, reporter, the_split=None):
    import kecompress
    from kecompress.evolution import Evolution

    if the_split is None:
        the_split = kecompress.split(model, "kels", setup["rate"], example_inputs=setup["example_inputs"],
                                     seed=SEED)
    return Evolution(model, the_split, setup["train_loader"], setup["val_loader"], setup["config"],
                     loss_fn=setup["loss_fn"], example_inputs=setup["example_inputs"], reporter=reporter)


def evolve_epoch(evolution, reporter, epoch: int, optimizer, schedule) -> float:
    """One epoch of the evolve loop, timed with the reporter's live display running, as the CLI
    runs it. ``_train_epoch`` is private: it is exactly the loop's epoch (seeding, the reporter
    calls, loss.item() and its finiteness check), without the per-generation work around it
    (a fresh optimizer, evaluation of the dense network and of the fit hypothesis), which a
    generation pays once rather than every epoch. Calling it from a benchmark is deliberate."""
    reporter.progress.start()  # the refresh thread runs only during evolve epochs, not plain ones
    try:
        started = time.perf_counter()
        evolution._train_epoch(1, epoch, optimizer, schedule)
        return time.perf_counter() - started
    finally:
        reporter.progress.stop()


# -- 1 and 2: epoch times, reset, in this process ----------------------------------------------
def measure_times(options: dict) -> dict:
    import kecompress
    from kecompress.evolution import CHECKPOINT, make_optimizer
    from kecompress.files import save_torch

    setup = build_setup(options)
    # One model, one optimizer and one schedule, which both loops take turns to train, so that the
    # loop code is the only difference between the sides (separate copies would also differ in
    # where their weights and momentum buffers sit in memory).
    model, loader, loss_fn, config = setup["model"], setup["train_loader"], setup["loss_fn"], setup["config"]
    steps = len(loader)
    optimizer, schedule = make_optimizer(model, config, steps)  # same settings as each generation's

    reporter = quiet_reporter()
    evolution = make_evolution(setup, model, reporter)
    reporter.generation_started(1, config.epochs, steps)  # as Evolution._train_generation does

    def timed_plain() -> float:
        started = time.perf_counter()
        plain_epoch(model, loader, optimizer, schedule, loss_fn)
        return time.perf_counter() - started

    # --breakdown: a third side, the evolve loop with no reporter, to split the overhead between
    # the reporter and the rest of the loop (seeding, loss.item(), the finiteness check).
    bare = None
    if options["breakdown"]:
        bare_evolution = make_evolution(setup, model, None, evolution.split)

        def bare(epoch: int) -> float:
            started = time.perf_counter()
            bare_evolution._train_epoch(1, epoch, optimizer, schedule)
            return time.perf_counter() - started

    def watched(run) -> tuple[float, float | None]:
        """Run one epoch; return its seconds and the CPUs other processes used meanwhile."""
        window = time.perf_counter()
        before = _cpu_seconds_of_others()
        seconds = run()
        after = _cpu_seconds_of_others()
        window = time.perf_counter() - window
        return seconds, None if before is None or after is None else max(after - before, 0.0) / window

    timed_plain()  # warm-up epochs, not recorded
    evolve_epoch(evolution, reporter, 0, optimizer, schedule)
    if bare:
        bare(0)
    # Interleaved rounds: plain, evolve (, bare), plain, evolve, ... A round is clean when other
    # processes used at most --quiet-cpus CPUs during each of its epochs; noisy rounds are kept
    # in the raw figures but replaced by extra rounds, up to --max-rounds in all, and none starts
    # after --time-limit seconds.
    rounds, clean = [], 0
    deadline = time.perf_counter() + options["time_limit"]
    while clean < options["rounds"] and len(rounds) < options["max_rounds"] and (
            time.perf_counter() < deadline or len(rounds) < 3):
        epoch = len(rounds) + 1
        round_ = {"plain": watched(timed_plain),
                  "evolve": watched(lambda: evolve_epoch(evolution, reporter, epoch, optimizer, schedule))}
        if bare:
            round_["bare"] = watched(lambda: bare(epoch))
        round_["clean"] = all(others is None or others <= options["quiet_cpus"]
                              for seconds, others in (round_[side] for side in ("plain", "evolve", "bare")
                                                      if side in round_))
        clean += round_["clean"]
        rounds.append(round_)
    enough_clean = clean >= min(3, options["rounds"])
    used = [round_ for round_ in rounds if round_["clean"] or not enough_clean]
    plain_times = [round_["plain"][0] for round_ in used]
    evolve_times = [round_["evolve"][0] for round_ in used]
    bare_times = [round_["bare"][0] for round_ in used if "bare" in round_]
    other_cpus = [others for round_ in used for side in ("plain", "evolve", "bare") if side in round_
                  for others in [round_[side][1]] if others is not None]
    other_cpus = statistics.mean(other_cpus) if other_cpus else None

    # The reporter's own work, alone: its calls in one epoch (epoch_started + a step_done per
    # step), and one render of the live display, which its refresh thread repeats several times a
    # second in the background while the epoch runs.
    reporter_costs, render_costs = [], []
    reporter.progress.start()
    try:
        for repeat in range(5):
            started = time.perf_counter()
            reporter.epoch_started(1, 0)
            for _ in range(steps):
                reporter.step_done(1.2345, options["batch_size"])
            reporter_costs.append(time.perf_counter() - started)
        live = reporter.progress.live
        for repeat in range(20):
            started = time.perf_counter()
            live.refresh()
            render_costs.append(time.perf_counter() - started)
        refreshes_per_second = live.refresh_per_second if live.auto_refresh else 0.0
    finally:
        reporter.progress.stop()

    # 2: the reset step, on the trained model (one warm-up reset first). A batch of resets
    # during which other processes used the CPUs is retried, twice at most; the quietest is kept.
    kecompress.reset_(model, evolution.split, seed=10_000)
    batches = []
    for batch in range(3):
        reset_times = []
        window, before = time.perf_counter(), _cpu_seconds_of_others()
        for repeat in range(options["resets"]):
            started = time.perf_counter()
            kecompress.reset_(model, evolution.split, seed=10_001 + repeat)
            reset_times.append(time.perf_counter() - started)
        after, window = _cpu_seconds_of_others(), time.perf_counter() - window
        others = None if before is None or after is None else max(after - before, 0.0) / window
        batches.append((others or 0.0, reset_times, others))
        if others is None or others <= options["quiet_cpus"]:
            break
    _, reset_times, reset_others = min(batches, key=lambda batch: batch[0])

    # The per-epoch checkpoint the command line also writes (it runs with a run directory),
    # outside _train_epoch: reported for information, not part of the epoch ratio.
    checkpoint_times = []
    with tempfile.TemporaryDirectory(prefix="kecompress-bench-") as run_dir:
        for repeat in range(3):
            started = time.perf_counter()
            save_torch(evolution.checkpoint_state(1, 1, optimizer, schedule), Path(run_dir) / CHECKPOINT)
            checkpoint_times.append(time.perf_counter() - started)
        checkpoint_bytes = (Path(run_dir) / CHECKPOINT).stat().st_size

    return {"steps_per_epoch": steps, "train_samples": setup["train_samples"],
            "plain_epoch_s": plain_times, "evolve_epoch_s": evolve_times, "reset_s": reset_times,
            "reset_other_processes_cpus": reset_others,
            "other_processes_cpus": other_cpus, "rounds_run": len(rounds), "rounds_clean": clean,
            "rounds_used": len(used), "all_rounds": [{side: list(value) if isinstance(value, tuple) else value
                                                       for side, value in round_.items()} for round_ in rounds],
            "bare_epoch_s": bare_times, "reporter_per_epoch_s": reporter_costs,
            "render_s": render_costs, "refreshes_per_second": refreshes_per_second,
            "checkpoint_s": checkpoint_times,
            "checkpoint_bytes": checkpoint_bytes,
            "split_fit_fraction": evolution.split.fit_fraction()}


def _cpu_seconds_of_others() -> float | None:
    """CPU seconds all other processes have used so far (Linux): the whole machine's busy time
    less this process's. Its growth over the timed rounds tells how much other work shared the
    CPUs with the measurement, i.e. how noisy the epoch times are."""
    busy = machine_busy_seconds()
    return None if busy is None else busy - own_cpu_seconds()


# -- 3: peak memory, each side in a fresh spawned child -----------------------------------------
def memory_child(side: str, options: dict) -> dict:
    """Build model and data, then train ``options['memory_epochs']`` epochs on one side; report
    this process's peak RSS. The evolve side also draws its split, trains with the reporter, and
    resets once between its epochs, as a generation boundary does."""
    # Both sides import the same modules before anything is measured against this baseline.
    import sklearn.datasets  # noqa: F401  (the demo data's loader)

    import kecompress
    import kecompress.report  # noqa: F401  (rich)
    from kecompress.evolution import make_optimizer

    imported_kib = _max_rss_kib()
    setup = build_setup(options)
    model, loader, config = setup["model"], setup["train_loader"], setup["config"]
    optimizer, schedule = make_optimizer(model, config, len(loader))
    if side == "plain":
        started = time.perf_counter()
        for _ in range(options["memory_epochs"]):
            plain_epoch(model, loader, optimizer, schedule, setup["loss_fn"])
    else:
        reporter = quiet_reporter()
        evolution = make_evolution(setup, model, reporter)
        reporter.generation_started(1, config.epochs, len(loader))
        started = time.perf_counter()
        for epoch in range(options["memory_epochs"]):
            if epoch:
                kecompress.reset_(model, evolution.split, seed=epoch)
            evolve_epoch(evolution, reporter, epoch, optimizer, schedule)
    seconds = time.perf_counter() - started
    return {"peak_rss_kib": _max_rss_kib(), "after_imports_kib": imported_kib, "vm_hwm_kib": _vm_hwm_kib(),
            "seconds": seconds}


def _max_rss_kib() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak // 1024 if sys.platform == "darwin" else peak  # bytes on macOS, KiB on Linux


def _vm_hwm_kib() -> int | None:
    # The kernel's own peak RSS of this address space, a cross-check of ru_maxrss (Linux only).
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def measure_memory(options: dict) -> dict:
    context = multiprocessing.get_context("spawn")
    results = {}
    for side in ("plain", "evolve"):
        with context.Pool(processes=1) as pool:  # a fresh process for each side
            results[side] = pool.apply(memory_child, (side, options))
    return results


# -- report -------------------------------------------------------------------------------------
def summarise(options: dict, times: dict, memory: dict) -> dict:
    import torch

    plain = statistics.median(times["plain_epoch_s"])
    evolve = statistics.median(times["evolve_epoch_s"])
    reset = statistics.median(times["reset_s"])
    paired = [e / p for p, e in zip(times["plain_epoch_s"], times["evolve_epoch_s"])]
    plain_rss, evolve_rss = memory["plain"]["peak_rss_kib"], memory["evolve"]["peak_rss_kib"]
    growth = {side: memory[side]["peak_rss_kib"] - memory[side]["after_imports_kib"] for side in memory}
    results = {
        "epoch_ratio": evolve / plain,
        "reset_fraction": reset / evolve,
        "memory_ratio": evolve_rss / plain_rss,
    }
    return {
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpu_count": os.cpu_count(), "torch": torch.__version__,
                    "torch_threads": options["threads"], "load_average": _load_average(),
                    "other_processes_cpus_during_rounds": times["other_processes_cpus"]},
        "settings": {key: options[key] for key in ("model", "batch_size", "samples", "rate", "rounds",
                                                   "resets", "image_size", "memory_epochs")}
                    | {"rounds_run": times["rounds_run"], "rounds_clean": times["rounds_clean"],
                       "rounds_used": times["rounds_used"], "quiet_cpus": options["quiet_cpus"],
                       "train_samples": times["train_samples"], "steps_per_epoch": times["steps_per_epoch"],
                       "data": "kecompress demo digits", "split": "kels"},
        "plain_epoch_median_s": plain,
        "evolve_epoch_median_s": evolve,
        "epoch_ratio": results["epoch_ratio"],
        "paired_epoch_ratios": paired,
        "paired_epoch_ratio_median": statistics.median(paired),
        "best_epoch_ratio": min(times["evolve_epoch_s"]) / min(times["plain_epoch_s"]),
        # The same comparison made between two halves of the plain epochs themselves (odd and
        # even rounds): how far apart two medians of identical work land in this run.
        "plain_half_ratio": (statistics.median(times["plain_epoch_s"][0::2])
                             / statistics.median(times["plain_epoch_s"][1::2])
                             if len(times["plain_epoch_s"]) >= 2 else None),
        "reset_median_s": reset,
        "reset_other_processes_cpus": times["reset_other_processes_cpus"],
        "reset_fraction_of_epoch": results["reset_fraction"],
        "reporter_per_epoch_median_s": statistics.median(times["reporter_per_epoch_s"]),
        "render_median_s": statistics.median(times["render_s"]),
        "refreshes_per_second": times["refreshes_per_second"],
        "bare_epoch_median_s": statistics.median(times["bare_epoch_s"]) if times["bare_epoch_s"] else None,
        "samples_for_reset_at_target": math.ceil(reset / TARGET_RESET_FRACTION / evolve * times["train_samples"]),
        "checkpoint_median_s": statistics.median(times["checkpoint_s"]),
        "checkpoint_bytes": times["checkpoint_bytes"],
        "plain_peak_rss_kib": plain_rss,
        "evolve_peak_rss_kib": evolve_rss,
        "memory_ratio": results["memory_ratio"],
        "rss_growth_after_imports_kib": growth,
        "memory_children": memory,
        "raw": {key: times[key] for key in ("plain_epoch_s", "evolve_epoch_s", "bare_epoch_s", "reset_s",
                                            "reporter_per_epoch_s", "render_s", "checkpoint_s",
                                            "all_rounds")},
        "targets": {"epoch_ratio": TARGET_EPOCH_RATIO, "reset_fraction": TARGET_RESET_FRACTION,
                    "memory_ratio": TARGET_MEMORY_RATIO},
        "passed": {"epoch_ratio": results["epoch_ratio"] <= TARGET_EPOCH_RATIO,
                   "reset_fraction": results["reset_fraction"] <= TARGET_RESET_FRACTION,
                   "memory_ratio": results["memory_ratio"] <= TARGET_MEMORY_RATIO},
    }


def _load_average() -> list[float] | None:
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except OSError:
        return None


def print_table(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:  # piped or redirected: rich would assume 80 columns
        console = Console(width=110)
    machine, settings = summary["machine"], summary["settings"]
    console.print(f"[bold]machine[/]: {machine['platform']}, Python {machine['python']}, "
                  f"{machine['cpu_count']} CPUs, torch {machine['torch']} "
                  f"({machine['torch_threads']} threads), load average {machine['load_average']}")
    others = machine["other_processes_cpus_during_rounds"]
    if others is not None:
        console.print(f"[bold]rounds[/]: {settings['rounds_clean']} clean of {settings['rounds_run']} run (clean: "
                      f"other processes used <= {settings['quiet_cpus']:g} CPU during each epoch); medians over "
                      f"{settings['rounds_used']} rounds, during which other processes used {others:.2f} of the "
                      f"{machine['cpu_count']} CPUs on average"
                      + ("" if settings["rounds_used"] == settings["rounds_clean"] else
                         ": [yellow]too few clean rounds, all rounds used; the epoch times are noisy, rerun "
                         "on an idle machine[/]"))
    console.print(f"[bold]work[/]: {settings['model']} on the {settings['data']} ({settings['image_size']}px), "
                  f"{settings['train_samples']} training images, batch {settings['batch_size']} "
                  f"({settings['steps_per_epoch']} steps an epoch), {settings['split'].upper()} rate "
                  f"{settings['rate']}; interleaved rounds (plain, evolve) after a warm-up epoch of each")

    def verdict(name: str) -> str:
        return "[green]pass[/]" if summary["passed"][name] else "[red]FAIL[/]"

    plain, evolve = summary["plain_epoch_median_s"], summary["evolve_epoch_median_s"]
    plain_mib, evolve_mib = summary["plain_peak_rss_kib"] / 1024, summary["evolve_peak_rss_kib"] / 1024
    growth = summary["rss_growth_after_imports_kib"]
    paired = summary["paired_epoch_ratios"]
    table = Table(title="Knowledge Evolution loop vs plain PyTorch loop")
    for header, justify in (("quantity", "left"), ("measured", "right"), ("target", "right"), ("", "center")):
        table.add_column(header, justify=justify)
    table.add_row("plain loop epoch (median)", f"{plain:.3f} s", "", "")
    table.add_row("evolve loop epoch (median, RichReporter)", f"{evolve:.3f} s", "", "")
    table.add_row("epoch time, evolve / plain", f"{summary['epoch_ratio']:.3f}",
                  f"<= {TARGET_EPOCH_RATIO:.2f}", verdict("epoch_ratio"))
    table.add_row("  per-round ratios (median; min-max)",
                  f"{summary['paired_epoch_ratio_median']:.3f}; {min(paired):.3f}-{max(paired):.3f}", "info", "")
    table.add_row("  fastest epochs, evolve / plain", f"{summary['best_epoch_ratio']:.3f}", "info", "")
    if summary["plain_half_ratio"] is not None:
        table.add_row("  noise: plain odd rounds / plain even rounds", f"{summary['plain_half_ratio']:.3f}",
                      "info", "")
    table.add_row("  reporter calls alone, per epoch (median)",
                  f"{1000 * summary['reporter_per_epoch_median_s']:.1f} ms "
                  f"({summary['reporter_per_epoch_median_s'] / evolve:.2%})", "info", "")
    render, refreshes = summary["render_median_s"], summary["refreshes_per_second"]
    table.add_row("  live display: one render; its refresh thread's CPU",
                  f"{1000 * render:.2f} ms x {refreshes:g}/s = {render * refreshes:.1%} of a core", "info", "")
    if summary["bare_epoch_median_s"] is not None:
        table.add_row("  evolve loop without reporter / plain (median)",
                      f"{summary['bare_epoch_median_s'] / plain:.3f}", "info", "")
    reset_others = summary["reset_other_processes_cpus"]
    table.add_row("reset_ (median)", f"{1000 * summary['reset_median_s']:.1f} ms"
                  + ("" if reset_others is None or reset_others <= settings["quiet_cpus"] else
                     f" [yellow](noisy: others used {reset_others:.2f} CPUs)[/]"), "", "")
    table.add_row("reset_ / evolve epoch", f"{summary['reset_fraction_of_epoch']:.4f}",
                  f"<= {TARGET_RESET_FRACTION:.2f}", verdict("reset_fraction"))
    table.add_row("  training images an epoch needs for reset_ <= target",
                  f"{summary['samples_for_reset_at_target']:,} (here {settings['train_samples']:,})", "info", "")
    checkpoint = summary["checkpoint_median_s"]
    table.add_row("  checkpoint the CLI writes each epoch (median)",
                  f"{1000 * checkpoint:.0f} ms ({checkpoint / evolve:.1%}, "
                  f"{summary['checkpoint_bytes'] / 2**20:.0f} MiB)",
                  "info", "")
    table.add_row("peak RSS, plain child", f"{plain_mib:,.0f} MiB", "", "")
    table.add_row("peak RSS, evolve child", f"{evolve_mib:,.0f} MiB", "", "")
    table.add_row("peak RSS, evolve / plain", f"{summary['memory_ratio']:.3f}",
                  f"<= {TARGET_MEMORY_RATIO:.2f}", verdict("memory_ratio"))
    table.add_row("  growth above post-import RSS, evolve / plain",
                  f"{growth['evolve'] / 1024:,.0f} / {growth['plain'] / 1024:,.0f} MiB "
                  f"= {growth['evolve'] / max(growth['plain'], 1):.3f}", "info", "")
    console.print(table)
    raw = summary["raw"]
    console.print("epochs (s) of the rounds used, plain: " + " ".join(f"{t:.2f}" for t in raw["plain_epoch_s"]))
    console.print("epochs (s), evolve: " + " ".join(f"{t:.2f}" for t in raw["evolve_epoch_s"]))
    if summary["raw"]["bare_epoch_s"]:
        console.print("epochs (s), evolve without reporter: "
                      + " ".join(f"{t:.2f}" for t in summary["raw"]["bare_epoch_s"]))


def parse_args(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default="resnet18", help="torchvision architecture, random init")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--samples", type=int, default=640,
                        help="use only the first N training images (0: all) to keep an epoch short")
    parser.add_argument("--rounds", type=int, default=30,
                        help="clean interleaved (plain, evolve) epoch pairs wanted")
    parser.add_argument("--max-rounds", type=int, default=0,
                        help="rounds to run at most while looking for --rounds clean ones (0: twice --rounds)")
    parser.add_argument("--time-limit", type=float, default=300,
                        help="seconds after which no further rounds start (at least 3 rounds run)")
    parser.add_argument("--quiet-cpus", type=float, default=0.1,
                        help="a round is clean when other processes used at most this many CPUs meanwhile")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch.set_num_threads")
    parser.add_argument("--resets", type=int, default=7, help="timed reset_ calls")
    parser.add_argument("--rate", type=float, default=0.5, help="KELS split rate")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--memory-epochs", type=int, default=2, help="epochs each memory child trains")
    parser.add_argument("--breakdown", action="store_true",
                        help="also interleave the evolve loop without a reporter, to attribute the overhead")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    for name in ("batch_size", "rounds", "threads", "resets", "memory_epochs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.samples < 0:
        parser.error("--samples must be 0 or more")
    options = vars(args)
    if args.max_rounds < 0 or args.quiet_cpus < 0 or args.time_limit < 0:
        parser.error("--max-rounds, --quiet-cpus and --time-limit must be 0 or more")
    options["max_rounds"] = max(args.max_rounds or 2 * args.rounds, args.rounds)
    # Every side steps the one shared schedule: make it long enough that no epoch runs past its end.
    options["epochs_in_schedule"] = 3 * (options["max_rounds"] + 1) + args.memory_epochs
    return options


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    memory = measure_memory(options)  # first, while this process is still small (see the imports)
    times = measure_times(options)
    summary = summarise(options, times, memory)
    if options["json"]:
        print(json.dumps(summary, indent=2, default=str))
    else:
        print_table(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
