"""Benchmark: what the Knowledge Evolution loop costs on top of a plain PyTorch training loop.

Measured side by side in one run, on the same model, data, loss, batch size, optimizer and
schedule (``kecompress.experiment.build`` of ``kecompress evolve MODEL`` on the bundled digits):

1. epoch time of the evolve loop (``Evolution.train_epoch`` with the command line's progress
   display, ``RichProgress``, attached) over the epoch time of a textbook PyTorch loop (target
   <= 1.03); after a warm-up epoch of each, the two take turns in interleaved rounds, and their
   medians are compared;
2. the reset step (``kecompress.reset_``) as a fraction of one median epoch (target <= 0.01);
3. peak memory (max RSS) of each side, each in its own fresh ``spawn`` child process doing the
   same work (target <= 1.10x);
4. an epoch with in-place distillation of the fit network (``--distill-fit``: the fit's slim
   forward and backward in every step) over an evolve epoch without, interleaved in the same
   rounds (target <= 1.40);
5. an epoch of edge-popup (``--split edge-popup``: frozen random weights, a learned score for every
   conv and linear weight, the top-k mask recomputed in every step) over an evolve epoch, both
   through the same loop and interleaved in the same rounds (target <= 1.30: the score step
   touches twice the parameters).

Nothing printed is hard-coded: every figure is measured in this run. Both loops take turns to
train one model with one optimizer, so that the loop code is the only difference. Other
processes sharing the CPUs make epoch times noisy (with every core in use, a preempted OpenMP
thread stalls the others), so rounds in which other processes used more than --quiet-cpus CPUs
are replaced by extra rounds (benchmarks/common.py), and the summary says how many were clean.
The plain epochs of odd and even rounds are also compared with each other, as a noise floor.
``--breakdown`` adds a third side, the evolve loop without callbacks, to attribute any overhead;
informational rows (target "info") break the costs down further. This is a benchmark, not a
test: it exits 0 whatever it measures.

Usage:
    .venv/bin/python benchmarks/train_overhead.py [--model resnet18] [--batch-size 32]
        [--samples 640] [--rounds 30] [--threads N] [--breakdown] [--json]
"""

from __future__ import annotations

import contextlib
import json
import math
import multiprocessing
import os
import resource
import statistics
import sys
import tempfile
from pathlib import Path

# Only the standard library at module level (common.py is too): the memory children are spawned
# before this process imports torch, because on Linux a child's ru_maxrss starts from the RSS of
# the process that spawned it (the high-water mark survives fork + exec), so a parent that has
# already trained a network would hide the children's own peaks.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, installed or not

from common import (Rounds, at_least, digits_run, machine, machine_line, parse_rounds, rich_table,  # noqa: E402
                    rounds_parser, run_script, timed, watch)

TARGETS = {"epoch_ratio": 1.03, "reset_fraction": 0.01, "memory_ratio": 1.10, "distill_ratio": 1.40,
           "edge_popup_ratio": 1.30}


def digits(options: dict):
    """The run both sides train, and its data (common.digits_run)."""
    return digits_run(options["samples"], options["epochs_in_schedule"], model=options["model"],
                      batch_size=options["batch_size"], rate=options["rate"], image_size=options["image_size"])


def evolve_loop(options: dict, display):
    """The evolve loop of the run, as ``kecompress evolve`` builds it, with its first optimizer."""
    from kecompress import experiment

    loop = experiment.build(*digits(options), callbacks=[display])
    loop.start_optimizer()
    loop.call("on_generation_start", 1)  # as the loop does when a generation starts
    return loop


def edge_popup_loop(options: dict, display):
    """The loop of ``kecompress evolve MODEL --split edge-popup`` on the same data, with its first optimizer."""
    from dataclasses import replace

    from kecompress import experiment

    config, data = digits(options)
    config = replace(config, split="edge-popup", training=replace(config.training, weight_decay=0.0))
    loop = experiment.build(config, data, callbacks=[display])
    loop.start_optimizer()
    loop.call("on_generation_start", 1)
    return loop


def quiet_display():
    """The command line's progress display, rendering as on a terminal, into /dev/null."""
    from rich.console import Console

    from kecompress.report import RichProgress

    # force_terminal: rich renders the live display exactly as in a real terminal; a plain file
    # console would skip the rendering and under-count its cost.
    console = Console(file=open(os.devnull, "w"), force_terminal=True, width=120, color_system="truecolor")
    return RichProgress(1, console=console)


def plain_epoch(model, loader, optimizer, schedule, loss_fn) -> None:
    """The textbook PyTorch training epoch."""
    model.train()
    for inputs, targets in loader:
        optimizer.zero_grad()
        loss = loss_fn(model(inputs), targets)
        loss.backward()
        optimizer.step()
        schedule.step()


def evolve_epoch(loop, display, epoch: int) -> float:
    """Seconds of one epoch of the evolve loop: ``loop.train_epoch``, exactly the loop's epoch
    (seeding, the callbacks, the loss summed and checked), without the work a generation pays once
    rather than every epoch (a fresh optimizer, evaluating the dense and the fit network). With
    ``display``, its live refresh runs during the epoch as in the command line; without, the loop
    has no callbacks (``--breakdown``'s third side)."""
    loop.callbacks = [display] if display else []
    with display or contextlib.nullcontext():  # the refresh thread runs during evolve epochs only
        return timed(lambda: loop.train_epoch(1, epoch))


def distilled_epoch(loop, display, fit_pass, epoch: int) -> float:
    """Seconds of one evolve epoch whose steps also distil the fit network, as ``--distill-fit``
    trains: the loop's own training step, given the distillation for this epoch only."""
    from kecompress.distillation import FitDistillation

    loop.step.distillation, loop.step.fit_pass = FitDistillation(start_generation=1), fit_pass  # on in generation 1
    try:
        return evolve_epoch(loop, display, epoch)
    finally:
        loop.step.distillation = loop.step.fit_pass = None


# -- 1 and 2: epoch times, reset, in this process ----------------------------------------------
def measure_times(options: dict) -> dict:
    import torch

    import kecompress
    from kecompress.checkpoint import checkpoint_state
    from kecompress.distillation import FitPass
    from kecompress.rundir import RunDirectory

    torch.set_num_threads(options["threads"])
    display = quiet_display()
    # One model, one optimizer and one schedule, which both loops take turns to train (separate
    # copies would also differ in where their weights and momentum buffers sit in memory).
    loop = evolve_loop(options, display)
    model, loader, steps = loop.model, loop.train_loader, len(loop.train_loader)
    sides = {"plain": lambda epoch: timed(lambda: plain_epoch(model, loader, loop.optimizer, loop.schedule,
                                                              loop.loss_fn)),
             "evolve": lambda epoch: evolve_epoch(loop, display, epoch)}
    fit_pass = FitPass(model, loop.split, loop.example_input())
    sides["distill"] = lambda epoch: distilled_epoch(loop, display, fit_pass, epoch)
    popup = edge_popup_loop(options, display)
    sides["edge_popup"] = lambda epoch: evolve_epoch(popup, display, epoch)
    if options["breakdown"]:
        sides["bare"] = lambda epoch: evolve_epoch(loop, None, epoch)
    for side in sides.values():
        side(0)  # warm-up epochs, not recorded
    rounds = Rounds(list(sides), wanted=options["rounds"], max_rounds=options["max_rounds"],
                    time_limit=options["time_limit"], quiet_cpus=options["quiet_cpus"])
    rounds.run(lambda side, index: watch(lambda: sides[side](index + 1)))

    # The display's own work, alone: its calls in one epoch (on_epoch_start and an on_step_end per
    # step), and one render of the live display, which its refresh thread repeats in the
    # background while an epoch runs.
    def display_calls() -> None:
        display.on_epoch_start(loop, 1, 0)
        for _ in range(steps):
            display.on_step_end(loop, 1.2345, options["batch_size"])

    with display:
        display_s = [timed(display_calls) for _ in range(5)]
        live = display.progress.live
        render_s = [timed(live.refresh) for _ in range(20)]
        refreshes = live.refresh_per_second if live.auto_refresh else 0.0

    # 2: the reset step, on the trained model (one warm-up reset first), in batches of --resets;
    # a batch during which other processes used the CPUs is tried again, twice at most.
    kecompress.reset_(model, loop.split, seed=10_000)
    resets = Rounds(["reset"], wanted=1, max_rounds=3, time_limit=math.inf, quiet_cpus=options["quiet_cpus"])
    resets.run(lambda side, index: watch(lambda: [timed(lambda: kecompress.reset_(model, loop.split, seed=seed))
                                                  for seed in range(10_001, 10_001 + options["resets"])]))

    # The per-epoch checkpoint the command line also writes (it runs with a run directory),
    # after the epoch: reported for information, not part of the epoch ratio.
    with tempfile.TemporaryDirectory(prefix="kecompress-bench-") as directory:
        run_dir = RunDirectory(directory)
        checkpoint_s = [timed(lambda: run_dir.write_checkpoint(checkpoint_state(loop))) for _ in range(3)]
        checkpoint_bytes = run_dir.checkpoint_file.stat().st_size
    return {"steps_per_epoch": steps, "train_samples": len(loader.dataset), "rounds": rounds, "resets": resets,
            "display_per_epoch_s": display_s, "render_s": render_s, "refreshes_per_second": refreshes,
            "checkpoint_s": checkpoint_s, "checkpoint_bytes": checkpoint_bytes}


# -- 3: peak memory, in fresh processes ----------------------------------------------------------
def memory_child(side: str, options: dict) -> dict:
    """Train --memory-epochs epochs of one side in this fresh process (the evolve side resetting
    between them); return its peak RSS, and the RSS after the imports both sides need."""
    import sklearn.datasets  # noqa: F401  (the demo data's loader)
    import torch

    import kecompress
    import kecompress.experiment  # noqa: F401  (the data, the models)
    import kecompress.report  # noqa: F401  (rich)
    from kecompress.data import make_loaders
    from kecompress.models import build_model
    from kecompress.training import make_optimizer

    imported_kib = max_rss_kib()
    torch.set_num_threads(options["threads"])
    if side == "plain":  # what a plain script sets up: build()'s model, loader, loss, optimizer; no split or loop
        config, (train, val, classes) = digits(options)
        torch.manual_seed(config.seed)
        model = build_model(config.model, len(classes))
        loader, _ = make_loaders(train, val, config.batch_size, config.seed)
        loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
        optimizer, schedule = make_optimizer(model, config.training, len(loader))
        seconds = timed(lambda: [plain_epoch(model, loader, optimizer, schedule, loss_fn)
                                 for _ in range(options["memory_epochs"])])
    else:
        display = quiet_display()
        loop = evolve_loop(options, display)

        def evolve_epochs() -> None:
            for epoch in range(options["memory_epochs"]):
                if epoch:
                    kecompress.reset_(loop.model, loop.split, seed=epoch)
                evolve_epoch(loop, display, epoch)
        seconds = timed(evolve_epochs)
    return {"peak_rss_kib": max_rss_kib(), "after_imports_kib": imported_kib, "vm_hwm_kib": vm_hwm_kib(),
            "seconds": seconds}


def max_rss_kib() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak // 1024 if sys.platform == "darwin" else peak  # bytes on macOS, KiB on Linux


def vm_hwm_kib() -> int | None:
    """The kernel's own peak RSS of this address space, a cross-check of ru_maxrss (Linux only)."""
    with contextlib.suppress(OSError):
        with open("/proc/self/status") as status:
            return next((int(line.split()[1]) for line in status if line.startswith("VmHWM:")), None)
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
    rounds, resets = times["rounds"], times["resets"]
    plain_s, evolve_s, distill_s = rounds.results("plain"), rounds.results("evolve"), rounds.results("distill")
    edge_popup_s = rounds.results("edge_popup")
    bare_s = rounds.results("bare") if options["breakdown"] else []
    reset_s = [seconds for batch in resets.results("reset") for seconds in batch]
    plain, evolve, reset = statistics.median(plain_s), statistics.median(evolve_s), statistics.median(reset_s)
    paired = [e / p for p, e in zip(plain_s, evolve_s)]
    rss = {side: memory[side]["peak_rss_kib"] for side in memory}
    measured = {"epoch_ratio": evolve / plain, "reset_fraction": reset / evolve,
                "memory_ratio": rss["evolve"] / rss["plain"], "distill_ratio": statistics.median(distill_s) / evolve,
                "edge_popup_ratio": statistics.median(edge_popup_s) / evolve}
    return {
        "machine": {**machine(options["threads"]), "other_processes_cpus_during_rounds": rounds.other_cpus()},
        "settings": {key: options[key] for key in ("model", "batch_size", "samples", "rate", "rounds", "resets",
                                                   "image_size", "memory_epochs", "quiet_cpus")}
                    | {"rounds_run": len(rounds.rounds), "rounds_clean": len(rounds.clean("plain")),
                       "rounds_used": len(plain_s), "train_samples": times["train_samples"],
                       "steps_per_epoch": times["steps_per_epoch"], "data": "kecompress demo digits", "split": "kels"},
        "plain_epoch_median_s": plain,
        "evolve_epoch_median_s": evolve,
        "paired_epoch_ratios": paired,
        "paired_epoch_ratio_median": statistics.median(paired),
        "best_epoch_ratio": min(evolve_s) / min(plain_s),
        # The same comparison made between two halves of the plain epochs themselves (odd and
        # even rounds): how far apart two medians of identical work land in this run.
        "plain_half_ratio": (statistics.median(plain_s[0::2]) / statistics.median(plain_s[1::2])
                             if len(plain_s) >= 2 else None),
        "reset_median_s": reset,
        "reset_other_processes_cpus": resets.other_cpus(),
        "display_per_epoch_median_s": statistics.median(times["display_per_epoch_s"]),
        "render_median_s": statistics.median(times["render_s"]),
        "refreshes_per_second": times["refreshes_per_second"],
        "bare_epoch_median_s": statistics.median(bare_s) if bare_s else None,
        "samples_for_reset_at_target": math.ceil(reset / TARGETS["reset_fraction"] / evolve * times["train_samples"]),
        "checkpoint_median_s": statistics.median(times["checkpoint_s"]),
        "checkpoint_bytes": times["checkpoint_bytes"],
        "peak_rss_kib": rss,
        "rss_growth_after_imports_kib": {side: rss[side] - memory[side]["after_imports_kib"] for side in memory},
        "memory_children": memory,
        "distill_epoch_median_s": statistics.median(distill_s),
        "edge_popup_epoch_median_s": statistics.median(edge_popup_s),
        "raw": {"plain_epoch_s": plain_s, "evolve_epoch_s": evolve_s, "bare_epoch_s": bare_s, "reset_s": reset_s,
                "distill_epoch_s": distill_s, "edge_popup_epoch_s": edge_popup_s,
                "display_per_epoch_s": times["display_per_epoch_s"], "render_s": times["render_s"],
                "checkpoint_s": times["checkpoint_s"],
                "all_rounds": [{side: [watched.result, watched.other_cpus] for side, watched in round_.items()}
                               for round_ in rounds.rounds]},
        "measured": measured,
        "targets": TARGETS,
        "passed": {name: measured[name] <= TARGETS[name] for name in TARGETS},
    }


def print_table(summary: dict) -> None:
    from rich.console import Console

    console = Console()
    if not console.is_terminal:  # piped or redirected: rich would assume 80 columns
        console = Console(width=110)
    described, settings, measured = summary["machine"], summary["settings"], summary["measured"]
    console.print(f"[bold]machine[/]: {machine_line(described)} ({described['threads']} threads), "
                  f"load average {described['load_average']}")
    others = described["other_processes_cpus_during_rounds"]
    if others is not None:
        console.print(f"[bold]rounds[/]: {settings['rounds_clean']} clean of {settings['rounds_run']} run (clean: "
                      f"other processes used <= {settings['quiet_cpus']:g} CPU during each epoch); medians over "
                      f"{settings['rounds_used']} rounds, during which other processes used {others:.2f} of the "
                      f"{described['cpu_count']} CPUs on average"
                      + ("" if settings["rounds_used"] == settings["rounds_clean"] else
                         ": [yellow]too few clean rounds, all rounds used; the epoch times are noisy, rerun "
                         "on an idle machine[/]"))
    console.print(f"[bold]work[/]: {settings['model']} on the {settings['data']} ({settings['image_size']}px), "
                  f"{settings['train_samples']} training images, batch {settings['batch_size']} "
                  f"({settings['steps_per_epoch']} steps an epoch), {settings['split'].upper()} rate "
                  f"{settings['rate']}; interleaved rounds (plain, evolve, evolve distilling the fit, edge-popup) after a "
                  "warm-up epoch of each")

    def target(name: str) -> list[str]:
        return [f"{measured[name]:.4f}" if name == "reset_fraction" else f"{measured[name]:.3f}",
                f"<= {TARGETS[name]:.2f}", "[green]pass[/]" if summary["passed"][name] else "[red]FAIL[/]"]

    evolve, paired, growth = summary["evolve_epoch_median_s"], summary["paired_epoch_ratios"], \
        summary["rss_growth_after_imports_kib"]
    display, render, refreshes = (summary[key] for key in ("display_per_epoch_median_s", "render_median_s",
                                                           "refreshes_per_second"))
    reset_others, checkpoint = summary["reset_other_processes_cpus"], summary["checkpoint_median_s"]
    rows = [
        ["plain loop epoch (median)", f"{summary['plain_epoch_median_s']:.3f} s", "", ""],
        ["evolve loop epoch (median, RichProgress)", f"{evolve:.3f} s", "", ""],
        ["epoch time, evolve / plain", *target("epoch_ratio")],
        ["  per-round ratios (median; min-max)",
         f"{summary['paired_epoch_ratio_median']:.3f}; {min(paired):.3f}-{max(paired):.3f}", "info", ""],
        ["  fastest epochs, evolve / plain", f"{summary['best_epoch_ratio']:.3f}", "info", ""],
        *([["  noise: plain odd rounds / plain even rounds", f"{summary['plain_half_ratio']:.3f}", "info", ""]]
          if summary["plain_half_ratio"] is not None else []),
        ["  display callbacks alone, per epoch (median)", f"{1000 * display:.1f} ms ({display / evolve:.2%})",
         "info", ""],
        ["  live display: one render; its refresh thread's CPU",
         f"{1000 * render:.2f} ms x {refreshes:g}/s = {render * refreshes:.1%} of a core", "info", ""],
        *([["  evolve loop without callbacks / plain (median)",
            f"{summary['bare_epoch_median_s'] / summary['plain_epoch_median_s']:.3f}", "info", ""]]
          if summary["bare_epoch_median_s"] is not None else []),
        ["reset_ (median)", f"{1000 * summary['reset_median_s']:.1f} ms"
         + ("" if reset_others is None or reset_others <= settings["quiet_cpus"] else
            f" [yellow](noisy: others used {reset_others:.2f} CPUs)[/]"), "", ""],
        ["reset_ / evolve epoch", *target("reset_fraction")],
        ["  training images an epoch needs for reset_ <= target",
         f"{summary['samples_for_reset_at_target']:,} (here {settings['train_samples']:,})", "info", ""],
        ["  checkpoint the CLI writes each epoch (median)", f"{1000 * checkpoint:.0f} ms ({checkpoint / evolve:.1%}, "
         f"{summary['checkpoint_bytes'] / 2**20:.0f} MiB)", "info", ""],
        *[[f"peak RSS, {side} child", f"{summary['peak_rss_kib'][side] / 1024:,.0f} MiB", "", ""]
          for side in ("plain", "evolve")],
        ["peak RSS, evolve / plain", *target("memory_ratio")],
        ["evolve loop epoch with in-place distillation (median)", f"{summary['distill_epoch_median_s']:.3f} s", "", ""],
        ["epoch time, distilling the fit / evolve", *target("distill_ratio")],
        ["edge-popup epoch (median; scores over frozen weights)", f"{summary['edge_popup_epoch_median_s']:.3f} s",
         "", ""],
        ["epoch time, edge-popup / evolve", *target("edge_popup_ratio")],
        ["  growth above post-import RSS, evolve / plain", f"{growth['evolve'] / 1024:,.0f} / "
         f"{growth['plain'] / 1024:,.0f} MiB = {growth['evolve'] / max(growth['plain'], 1):.3f}", "info", ""],
    ]
    console.print(rich_table("Knowledge Evolution loop vs plain PyTorch loop", ["quantity", "measured", "target", ""],
                             rows))
    raw = summary["raw"]
    for name, key in (("epochs (s) of the rounds used, plain", "plain_epoch_s"),
                      ("epochs (s), evolve", "evolve_epoch_s"),
                      ("epochs (s), evolve without callbacks", "bare_epoch_s"),
                      ("epochs (s), evolve distilling the fit", "distill_epoch_s"),
                      ("epochs (s), edge-popup", "edge_popup_epoch_s")):
        if raw[key]:
            console.print(f"{name}: " + " ".join(f"{seconds:.2f}" for seconds in raw[key]))


def parse_args(argv: list[str] | None = None) -> dict:
    parser = rounds_parser(__doc__.split("\n\n")[0], samples=640, rounds=30, time_limit=300, quiet_cpus=0.1)
    parser.add_argument("--threads", type=at_least(1), default=os.cpu_count() or 1, help="torch.set_num_threads")
    parser.add_argument("--resets", type=at_least(1), default=7, help="timed reset_ calls")
    parser.add_argument("--rate", type=float, default=0.5, help="KELS split rate")
    parser.add_argument("--memory-epochs", type=at_least(1), default=2, help="epochs each memory child trains")
    parser.add_argument("--breakdown", action="store_true",
                        help="also interleave the evolve loop without callbacks, to attribute the overhead")
    options = parse_rounds(parser, argv)
    # Every side steps the one shared schedule: make it long enough that no epoch runs past its end.
    options["epochs_in_schedule"] = 3 * (options["max_rounds"] + 1) + options["memory_epochs"]
    return options


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    memory = measure_memory(options)  # first, while this process is still small (see the imports)
    summary = summarise(options, measure_times(options), memory)
    if options["json"]:
        print(json.dumps(summary, indent=2, default=str))
    else:
        print_table(summary)
    return 0


if __name__ == "__main__":
    sys.exit(run_script("train_overhead", main))
