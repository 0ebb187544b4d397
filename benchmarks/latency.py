"""Latency of the dense network and its KELS fit (rate 0.5) for eight torchvision classifiers, in
onnxruntime: the paper's channel rule and aligned splits, fp32 and static INT8.

Prints a table per thread count and writes docs/benchmarks.md and docs/benchmarks.png. The
part of docs/benchmarks.md below the ANALYSIS marker is written by hand and kept across runs;
benchmarks/latency_profile.py measures where the time goes when a fit falls short.

    .venv/bin/python benchmarks/latency.py  # 8 models, align 1,8,16, 1 and 2 threads, fp32, INT8: 20-30 min on 2 cores
    .venv/bin/python benchmarks/latency.py --models mobilenet_v2 --align 16 --threads 1 --runs 200 --no-report
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
import torch
from rich.console import Console

import kecompress
from common import at_least, machine, machine_line, markdown_table, rich_table, run_script, watch, write_report
from kecompress.bench import BatchLatency, LatencyResult, describe_cpu_flags, measure_latency
from kecompress.data import demo_datasets
from kecompress.export import DEFAULT_EXPORTER, LOWEST_OPSET, export_pair
from kecompress.models import build_model

MODELS = ["resnet18", "resnet50", "mobilenet_v2", "densenet121", "mobilenet_v3_small", "efficientnet_b0",
          "vgg11_bn", "regnet_x_400mf"]
# Targets on the onnxruntime fp32 efficiency at 1 thread: of the best alignment, or of the paper's rule (align 1).
BEST_ALIGN_TARGETS = {"mobilenet_v2": 0.90, "densenet121": 0.90, "mobilenet_v3_small": 0.90,
                      "efficientnet_b0": 0.90, "regnet_x_400mf": 0.90}
PAPER_RULE_TARGETS = {"resnet18": 0.95, "resnet50": 0.95}
# ResNet18 at 1 thread, the paper's rule: INT8 fit over fp32 fit, and fp32 dense over INT8 fit.
INT8_TARGETS = {"resnet18": (1.8, 6.5)}
RATE, INPUT_SHAPE = 0.5, (3, 224, 224)
# Calibration sets the INT8 scales, not the speed: a few bundled digits keep quantising short.
CALIBRATION_IMAGES = 32
DOCS = Path(__file__).resolve().parent.parent / "docs"
FP32_HEADER = ["model", "align", "MACs dense", "MACs fit", "MAC ratio", "fp32 dense ms", "fp32 fit ms",
               "fp32 speedup", "efficiency"]
INT8_HEADER = ["INT8 dense ms", "INT8 fit ms", "fp32 / INT8 dense", "fp32 dense / INT8 fit", "fp32 fit / INT8 fit",
               "INT8 fit keeps in fp32"]
LOAD_HEADER = ["load", "others' CPUs"]


@dataclass(frozen=True)
class Row:
    """One model, alignment and thread count: what measure_latency returned, and how busy the
    machine was (1-minute load average after it; CPUs other processes used during it)."""

    model: str
    align: int
    threads: int
    result: LatencyResult
    load: float
    others: float | None
    same_as: int | None = None  # the alignment measured already whose split this one equals

    @property
    def latency(self) -> BatchLatency:
        return self.result.results[0]


def build(name: str) -> torch.nn.Module:
    return build_model(name, num_classes=1000).eval()


def split_model(dense: torch.nn.Module, align: int = 1) -> kecompress.Split:
    return kecompress.split(dense, "kels", RATE, torch.randn(1, *INPUT_SHAPE), align=align)


def slice_model(dense: torch.nn.Module, the_split: kecompress.Split) -> torch.nn.Module:
    return kecompress.slice_fit(dense, the_split, torch.randn(1, *INPUT_SHAPE))


def same_split(first: kecompress.Split, second: kecompress.Split) -> bool:
    return first.masks.keys() == second.masks.keys() and all(
        torch.equal(first.masks[name], second.masks[name]) for name in first.masks)


def tool_timings(threads: int) -> dict:
    """Seconds to split and slice ResNet50, and to export and check ResNet18's dense and fit."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        dense = build("resnet50")
        start = time.perf_counter()
        slice_model(dense, split_model(dense))
        slicing = time.perf_counter() - start
        dense = build("resnet18")
        fit = slice_model(dense, split_model(dense))
        with tempfile.TemporaryDirectory() as directory:
            start = time.perf_counter()
            export_pair(dense, fit, directory, INPUT_SHAPE)
            exporting = time.perf_counter() - start
    finally:
        torch.set_num_threads(previous)
    return {"threads": threads, "slice_resnet50_s": slicing, "export_resnet18_s": exporting}


def measure_model(name: str, args, calibration) -> list[Row]:
    """The rows of one model: every alignment at every thread count."""
    dense = build(name)
    splits, rows = {}, []
    for align in args.align:
        splits[align] = the_split = split_model(dense, align)
        same = next((earlier for earlier, other in splits.items() if earlier != align and same_split(other, the_split)),
                    None)
        if same is not None:  # the aligned split keeps the very channels of an alignment measured already
            rows += [replace(row, align=align, same_as=same) for row in rows if row.align == same]
            continue
        fit = slice_model(dense, the_split)
        for threads in args.threads:
            watched = watch(lambda: measure_latency(
                dense, fit, INPUT_SHAPE, runtimes=("onnxruntime",), threads=threads, warmup=args.warmup,
                runs=args.runs, int8_calibration=calibration, calibration_images=CALIBRATION_IMAGES,
                clock=clock(threads, args)))
            rows.append(Row(name, align, threads, watched.result, os.getloadavg()[0], watched.other_cpus))
    return rows


def clock(threads: int, args) -> str:
    # Other jobs on a shared machine take the core away in the middle of a run; one thread's CPU
    # time leaves that out (at load 6, ResNet18's dense network: 78.5 ms wall, 34.3 ms thread).
    return "thread" if threads == 1 and not args.wall_clock else "wall"


def ms(median: float, p90: float) -> str:
    return f"{median:.2f} / {p90:.2f}"


def cells(row: Row, int8: bool) -> list[str]:
    latency, fp32 = row.latency, row.latency.onnxruntime
    align = f"{row.align} (= {row.same_as})" if row.same_as else str(row.align)
    line = [row.model, align, f"{row.result.dense.macs / 1e9:.3f} G", f"{row.result.fit.macs / 1e9:.3f} G",
            f"{latency.macs_ratio:.2f}x", ms(fp32.dense_median_ms, fp32.dense_p90_ms),
            ms(fp32.fit_median_ms, fp32.fit_p90_ms), f"{fp32.speedup:.2f}x", f"{fp32.efficiency:.2f}"]
    if int8:
        # the networks export --int8 writes; where no INT8 network beats fp32 it writes none
        quantized = latency.int8
        kept = quantized.fit_choice.kept_fp32
        line += [ms(quantized.dense_median_ms, quantized.dense_p90_ms) if quantized.dense_choice.written else "none",
                 ms(quantized.fit_median_ms, quantized.fit_p90_ms) if quantized.fit_choice.written else "none",
                 f"{quantized.dense_speedup:.2f}x" if quantized.dense_choice.written else "-",
                 f"{quantized.speedup:.2f}x" if quantized.fit_choice.written else "-",
                 f"{fp32.fit_median_ms / quantized.fit_median_ms:.2f}x" if quantized.fit_choice.written else "-",
                 (", ".join(kept) or "nothing") if quantized.fit_choice.written else "INT8 slower than fp32"]
    return line + [f"{row.load:.1f}", "-" if row.others is None else f"{row.others:.2f}"]


def header(int8: bool) -> list[str]:
    return FP32_HEADER + (INT8_HEADER if int8 else []) + LOAD_HEADER


def at(rows: list[Row], threads: int) -> list[Row]:
    return [row for row in rows if row.threads == threads]


def verdict(value: float, target: float, unit: str = "", digits: int = 3) -> str:
    # Three decimals for efficiencies: a 0.897 shown as 0.90 beside "MISSED" would read as a contradiction.
    return f"{'met' if value >= target else 'MISSED'} ({value:.{digits}f}{unit} vs {target:.2f}{unit})"


def target_rows(rows: list[Row]) -> list[list[str]]:
    """Per model at 1 thread: the paper's rule, the best alignment, and the target's verdict."""
    lines = []
    for model in dict.fromkeys(row.model for row in rows):
        mine = [row for row in rows if row.model == model and row.threads == 1]
        paper = next((row for row in mine if row.align == 1), None)
        best = max(mine, key=lambda row: row.latency.onnxruntime.efficiency)
        if model in PAPER_RULE_TARGETS and paper:
            goal = f"align 1: {verdict(paper.latency.onnxruntime.efficiency, PAPER_RULE_TARGETS[model])}"
        elif model in BEST_ALIGN_TARGETS:
            goal = f"best: {verdict(best.latency.onnxruntime.efficiency, BEST_ALIGN_TARGETS[model])}"
        else:
            goal = "-"
        paper_cells = ([f"{paper.latency.macs_ratio:.2f}x", f"{paper.latency.onnxruntime.speedup:.2f}x",
                        f"{paper.latency.onnxruntime.efficiency:.2f}"] if paper else ["-"] * 3)
        lines.append([model, *paper_cells, str(best.align), f"{best.latency.macs_ratio:.2f}x",
                      f"{best.latency.onnxruntime.speedup:.2f}x", f"{best.latency.onnxruntime.efficiency:.2f}", goal])
    return lines


def int8_target_rows(rows: list[Row]) -> list[list[str]]:
    lines = []
    for model, (over_fit, over_dense) in INT8_TARGETS.items():
        row = next((row for row in rows if row.model == model and row.threads == 1 and row.align == 1), None)
        if row and row.latency.int8 and row.latency.int8.fit_choice.written:
            fp32, quantized = row.latency.onnxruntime, row.latency.int8
            lines.append([model, verdict(fp32.fit_median_ms / quantized.fit_median_ms, over_fit, "x", 2),
                          verdict(quantized.speedup, over_dense, "x", 2)])
    return lines


def write_markdown(path: Path, rows: list[Row], timings: list[dict], args, command: str, load: tuple) -> None:
    described = machine()
    isa = describe_cpu_flags(described["cpu_flags"])
    lines = [
        "# Benchmarks: dense network vs KELS fit",
        "",
        f"Measured {datetime.date.today().isoformat()} on {machine_line(described)}, "
        f"onnxruntime {described['onnxruntime']}; {isa}. Load average (1 min) when the run started / ended: "
        f"{load[0]:.2f} / {load[1]:.2f}.",
        "",
        f"Randomly initialised torchvision models (1000 classes), KELS split rate {RATE}: align 1 is the paper's "
        "rule (`ceil(rate * C)` channels per layer), align 8 and 16 round every coupled group's kept channels up "
        "to a multiple of 8 or 16 (`--align`); an aligned split that keeps the very channels of a smaller "
        "alignment is measured once and marked `8 (= 1)`. "
        f"Batch 1, {INPUT_SHAPE[1]}x{INPUT_SHAPE[2]}, `kecompress.bench.measure_latency`: torch's {DEFAULT_EXPORTER} "
        f"ONNX exporter (opset {LOWEST_OPSET[DEFAULT_EXPORTER]}), onnxruntime CPUExecutionProvider, all graph "
        "optimisations, the stated intra-op threads, one inter-op thread; "
        f"{args.warmup} warm-up and {args.runs} timed runs of each network"
        + (", the fp32 and INT8 dense and fit networks all four interleaved. INT8: static, QDQ, per-channel int8 "
           f"weights, uint8 activations, the classifier in fp32, calibrated on {CALIBRATION_IMAGES} bundled digits "
           "images (`kecompress bench --int8`); the networks `export --int8` writes: the kinds of convolutions "
           "that lose kept in fp32 one by one while INT8 runs slower, and no INT8 network (`none`) where it "
           "stays slower." if args.int8 else ", dense and fit interleaved.")
        + " Latency in ms, median / 90th percentile"
        + ("" if args.wall_clock else ": at 1 thread the CPU time of the thread that runs the network "
           "(`--clock thread`), which leaves out the time other jobs on this shared machine take its core away; "
           "at more threads the wall clock")
        + ". Efficiency is fp32 speedup / MAC ratio: 1.00 means the fit is "
        "as much faster as its MACs are fewer. Load: the machine's 1-minute load average right after the row "
        "(the benchmark itself adds up to its thread count); others' CPUs: the CPUs other processes kept busy "
        "on average while the row was measured (export and quantisation included).",
        "",
    ]
    for threads in args.threads:
        lines += [f"## {threads} thread{'s' if threads > 1 else ''}", ""]
        if clock(threads, args) == "wall":
            others = [row.others for row in at(rows, threads) if row.others is not None and row.same_as is None]
            if others:
                lines += [f"Wall clock: other processes kept {min(others):.2f}-{max(others):.2f} of the "
                          f"{os.cpu_count()} CPUs busy while these rows were measured; whatever they took from "
                          f"the {threads} threads is in the milliseconds.", ""]
        if args.int8:
            lines += [f"INT8 ran on this {isa}.", ""]
        lines += markdown_table(header(args.int8), [cells(row, args.int8) for row in at(rows, threads)])
    if 1 in args.threads:
        lines += ["## Targets (1 thread, fp32)", "",
                  "Efficiency targets: at least 0.90 with the best alignment for the MobileNets, EfficientNet-B0, "
                  "RegNetX-400MF and DenseNet121; at least 0.95 with the paper's rule for the ResNets.", "",
                  *markdown_table(["model", "align 1: MAC ratio", "align 1: speedup", "align 1: efficiency",
                                   "best align", "best: MAC ratio", "best: speedup", "best: efficiency", "target"],
                                  target_rows(rows))]
        if args.int8 and int8_target_rows(rows):
            lines += [f"INT8 targets (1 thread, align 1; {isa}):", "",
                      *markdown_table(["model", "fp32 fit / INT8 fit (target 1.8x)",
                                       "fp32 dense / INT8 fit (target 6.5x)"], int8_target_rows(rows))]
    lines += ["## Tool timings", "", *markdown_table(
        ["torch threads", "split + slice ResNet50 (target < 5 s)",
         "export + parity check of ResNet18 dense and fit (target < 30 s)"],
        [[str(t["threads"]), f"{t['slice_resnet50_s']:.2f} s", f"{t['export_resnet18_s']:.2f} s"] for t in timings])]
    lines += [
        "WELS is not in the tables: its fit is the dense network with zeros in it, and dense runtimes "
        "multiply zeros at dense speed.",
        "",
        "![efficiency per alignment, and INT8](benchmarks.png)",
        "",
        f"Reproduce: `{command}`",
        "",
    ]
    write_report(path, lines)


def write_chart(path: Path, rows: list[Row], args) -> None:
    """Efficiency per model and alignment (fp32) and, with INT8, what INT8 adds to the fit: at the
    lowest thread count."""
    threads = min(args.threads)
    names = list(dict.fromkeys(row.model for row in rows))
    by_key = {(row.model, row.align): row for row in at(rows, threads)}
    targets = {**BEST_ALIGN_TARGETS, **PAPER_RULE_TARGETS}
    panels = [("efficiency: fp32 speedup / MAC ratio", lambda row: row.latency.onnxruntime.efficiency, 1.0,
               "speedup = MAC ratio (ceiling)", targets, f"KELS fit at rate {RATE}, fp32: how much of the MAC ratio "
               f"onnxruntime turns into speed ({threads} thread, batch 1, {INPUT_SHAPE[1]} px)")]
    if args.int8:
        panels.append(("fp32 fit ms / INT8 fit ms", lambda row: row.latency.onnxruntime.fit_median_ms
                       / row.latency.int8.fit_median_ms if row.latency.int8.fit_median_ms else 0.0, 1.0, "no gain",
                       {model: over_fit for model, (over_fit, _) in INT8_TARGETS.items()},
                       f"INT8 fit vs fp32 fit ({describe_cpu_flags(rows[0].result.machine['cpu_flags'])})"))
    width = 0.8 / len(args.align)
    figure, all_axes = plt.subplots(len(panels), 1, figsize=(max(8.0, 1.3 * len(names)), 4.2 * len(panels)),
                                    squeeze=False)
    for axes, (label, value, reference, reference_label, goals, title) in zip(all_axes[:, 0], panels):
        tallest = reference
        for index, align in enumerate(args.align):
            offsets = [i + (index - (len(args.align) - 1) / 2) * width for i in range(len(names))]
            values = [value(by_key[name, align]) for name in names]
            bars = axes.bar(offsets, values, width, label="align 1 (paper's rule)" if align == 1 else f"align {align}")
            axes.bar_label(bars, fmt="%.2f", fontsize=7, padding=1)
            tallest = max(tallest, *values)
        axes.axhline(reference, color="black", linewidth=1, linestyle="--", label=reference_label)
        marked = [(index, goals[name]) for index, name in enumerate(names) if name in goals]
        for count, (index, goal) in enumerate(marked):  # one red bar across each model's group of bars
            axes.hlines(goal, index - 0.45, index + 0.45, color="red", linewidth=2, label=None if count else "target")
        axes.set_xticks(range(len(names)), names, rotation=20, ha="right")
        axes.set_ylabel(label)
        axes.set_ylim(0, tallest * 1.3)  # room for the legend above the bars
        axes.set_title(title, fontsize="medium")
        axes.legend(fontsize="small", ncol=len(args.align) + 2, loc="upper center")
        axes.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def counts(text: str) -> list[int]:
    """An argparse ``type``: comma-separated whole numbers of at least 1."""
    return [at_least(1)(part) for part in text.split(",")]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated torchvision names")
    parser.add_argument("--align", type=counts, default=[1, 8, 16],
                        help="comma-separated KELS alignments, 1 the paper's rule (default 1,8,16)")
    parser.add_argument("--int8", action=argparse.BooleanOptionalAction, default=True,
                        help="also time the static INT8 networks (default: on)")
    parser.add_argument("--wall-clock", action="store_true",
                        help="time 1 thread on the wall clock too, not on its thread's CPU time")
    parser.add_argument("--report", action=argparse.BooleanOptionalAction, default=True,
                        help="write docs/benchmarks.md and .png (default); --no-report to rerun a few models and "
                             "only print")
    parser.add_argument("--runs", type=at_least(1), default=100, help="timed runs of each network (default 100)")
    parser.add_argument("--warmup", type=at_least(0), default=10,
                        help="untimed runs of each network first (default 10)")
    parser.add_argument("--threads", type=counts, default=[1, 2],
                        help="comma-separated CPU thread counts (default 1,2)")
    args = parser.parse_args(argv)
    console = Console(width=240)  # the tables are wide; logs are not terminals
    command = "python benchmarks/latency.py " + " ".join(argv if argv is not None else sys.argv[1:])
    start_load = os.getloadavg()[0]
    torch.manual_seed(0)
    # Untimed work (slicing, tracing for export) at the lowest count: on a busy machine, extra
    # OpenMP threads mostly wait for each other. Each measurement sets its own count.
    torch.set_num_threads(min(args.threads))
    # onnxruntime's quantiser logs a pre-processing hint for every file; kecompress.quantize measured it useless.
    logging.getLogger().setLevel(logging.ERROR)

    timings = [tool_timings(threads) for threads in args.threads]
    for timing in timings:
        console.print(f"{timing['threads']} torch thread(s): split + slice ResNet50 {timing['slice_resnet50_s']:.2f} s "
                      f"(target < 5 s); export + parity check of ResNet18 dense and fit "
                      f"{timing['export_resnet18_s']:.2f} s (target < 30 s)")
    calibration = demo_datasets(INPUT_SHAPE[1])[0] if args.int8 else None
    rows = []
    for name in [name.strip() for name in args.models.split(",") if name.strip()]:
        started = time.perf_counter()
        rows += measure_model(name, args, calibration)
        console.print(f"{name} ({time.perf_counter() - started:.0f} s): " + ", ".join(
            f"align {row.align} {row.threads} thr. {row.latency.onnxruntime.efficiency:.2f}"
            for row in rows if row.model == name))
    for threads in args.threads:
        console.print(rich_table(f"KELS rate {RATE}, batch 1, {INPUT_SHAPE[1]}x{INPUT_SHAPE[2]}, onnxruntime, "
                                 f"{threads} thread(s): dense vs fit (ms: median / p90)",
                                 header(args.int8), [cells(row, args.int8) for row in at(rows, threads)]))

    if not args.report:
        return 0
    DOCS.mkdir(exist_ok=True)
    write_markdown(DOCS / "benchmarks.md", rows, timings, args, command.strip(), (start_load, os.getloadavg()[0]))
    write_chart(DOCS / "benchmarks.png", rows, args)
    console.print(f"wrote {DOCS / 'benchmarks.md'} and {DOCS / 'benchmarks.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(run_script("latency", main))
