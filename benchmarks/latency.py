"""Latency of the dense network and its KELS fit (rate 0.5) for torchvision classifiers.

Prints a table per thread count and writes docs/benchmarks.md and docs/benchmarks.png. The
part of docs/benchmarks.md below the ANALYSIS marker is written by hand and kept across runs.

    .venv/bin/python benchmarks/latency.py                       # all models, 1 and 2 threads: 3-5 minutes on 2 cores
    .venv/bin/python benchmarks/latency.py --models resnet18 --runs 100 --threads 2
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
import torch
from rich.console import Console

import kecompress
from common import at_least, machine, machine_line, markdown_table, rich_table, run_script, write_report
from kecompress.bench import LatencyResult, latency_cells, measure_latency
from kecompress.export import DEFAULT_EXPORTER, LOWEST_OPSET, export_pair
from kecompress.models import build_model

MODELS = ["resnet18", "resnet50", "mobilenet_v2", "densenet121", "mobilenet_v3_small", "efficientnet_b0",
          "vgg11_bn", "regnet_x_400mf"]
# The onnxruntime speedup must reach this fraction of the MAC ratio.
TARGETS = {"resnet18": 0.95, "resnet50": 0.90, "mobilenet_v2": 0.90, "densenet121": 0.90}
RATE, INPUT_SHAPE = 0.5, (3, 224, 224)
DOCS = Path(__file__).resolve().parent.parent / "docs"
HEADER = ["model", "MACs dense", "MACs fit", "MAC ratio", "ORT dense ms", "ORT fit ms", "ORT speedup",
          "ORT efficiency", "target", "torch dense ms", "torch fit ms", "torch speedup", "load"]


def build(name: str) -> torch.nn.Module:
    return build_model(name, num_classes=1000).eval()


def slice_model(dense: torch.nn.Module) -> torch.nn.Module:
    example = torch.randn(1, *INPUT_SHAPE)
    return kecompress.slice_fit(dense, kecompress.split(dense, "kels", RATE, example), example)


def tool_timings(threads: int) -> dict:
    """Seconds to split and slice ResNet50, and to export and check ResNet18's dense and fit."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        dense = build("resnet50")
        start = time.perf_counter()
        slice_model(dense)
        slicing = time.perf_counter() - start
        dense = build("resnet18")
        fit = slice_model(dense)
        with tempfile.TemporaryDirectory() as directory:
            start = time.perf_counter()
            export_pair(dense, fit, directory, INPUT_SHAPE)
            exporting = time.perf_counter() - start
    finally:
        torch.set_num_threads(previous)
    return {"threads": threads, "slice_resnet50_s": slicing, "export_resnet18_s": exporting}


def cells(model: str, result: LatencyResult, load: float) -> list[str]:
    row = result.results[0]
    target, ort = TARGETS.get(model), row.onnxruntime
    verdict = "-" if target is None else f"{target:.2f} {'met' if ort.efficiency >= target else 'MISSED'}"
    return [model, f"{result.dense.macs / 1e9:.3f} G", f"{result.fit.macs / 1e9:.3f} G", f"{row.macs_ratio:.2f}x",
            *latency_cells(ort), f"{ort.efficiency:.3f}", verdict, *latency_cells(row.torch), f"{load:.1f}"]


def rows(results: dict, threads: int) -> list[list[str]]:
    return [cells(model, *by_threads[threads]) for model, by_threads in results.items()]


def write_markdown(path: Path, results: dict, timings: list[dict], args, command: str, load: tuple) -> None:
    described = machine()
    lines = [
        "# Benchmarks: dense network vs KELS fit",
        "",
        f"Measured {datetime.date.today().isoformat()} on {machine_line(described)}, "
        f"onnxruntime {described['onnxruntime']}. Load average (1 min) when the run started / ended: "
        f"{load[0]:.2f} / {load[1]:.2f}.",
        "",
        f"Randomly initialised torchvision models (1000 classes), KELS split rate {RATE}, batch 1, "
        f"{INPUT_SHAPE[1]}x{INPUT_SHAPE[2]}, {args.warmup} warm-up and {args.runs} timed runs of each network, "
        f"dense and fit interleaved. ORT: torch's {DEFAULT_EXPORTER} ONNX exporter, opset {LOWEST_OPSET[DEFAULT_EXPORTER]}, "
        "onnxruntime CPUExecutionProvider, all graph "
        "optimisations, the stated intra-op threads, one inter-op thread. torch: eager, `inference_mode`, "
        "`torch.set_num_threads` as stated. Latency in ms, median / 90th percentile. Efficiency is speedup / "
        "MAC ratio: 1.00 means the fit is as much faster as its MACs are fewer. The target is on the ORT "
        "efficiency. Load: the machine's 1-minute load average right after the row was measured (the "
        "benchmark itself adds up to its thread count).",
        "",
    ]
    for threads in args.threads:
        lines += [f"## {threads} thread{'s' if threads > 1 else ''}", "",
                  *markdown_table(HEADER, rows(results, threads))]
    lines += ["## Tool timings", "", *markdown_table(
        ["torch threads", "split + slice ResNet50 (target < 5 s)",
         "export + parity check of ResNet18 dense and fit (target < 30 s)"],
        [[str(t["threads"]), f"{t['slice_resnet50_s']:.2f} s", f"{t['export_resnet18_s']:.2f} s"] for t in timings])]
    lines += [
        "WELS is not in the tables: its fit is the dense network with zeros in it, and dense runtimes "
        "multiply zeros at dense speed.",
        "",
        "![MAC ratio and speedups](benchmarks.png)",
        "",
        f"Reproduce: `{command}`",
        "",
    ]
    write_report(path, lines)


def write_chart(path: Path, results: dict, thread_counts: list[int]) -> None:
    names = list(results)
    series = [("MAC ratio (ceiling)", thread_counts[0], lambda row: row.macs_ratio)]
    for threads in thread_counts:
        series += [(f"onnxruntime, {threads} thr.", threads, lambda row: row.onnxruntime.speedup),
                   (f"torch eager, {threads} thr.", threads, lambda row: row.torch.speedup)]
    width = 0.8 / len(series)
    figure, axes = plt.subplots(figsize=(max(7.0, 1.4 * len(names)), 4.8))
    tallest = 0.0
    for index, (label, threads, value) in enumerate(series):
        values = [value(results[name][threads][0].results[0]) for name in names]
        offsets = [i + (index - (len(series) - 1) / 2) * width for i in range(len(names))]
        axes.bar(offsets, values, width, label=label)
        tallest = max(tallest, *values)
    axes.set_xticks(range(len(names)), names, rotation=25, ha="right")
    axes.set_ylabel("dense / fit")
    axes.set_ylim(0, tallest * 1.25)  # room for the legend above the bars
    axes.set_title(f"KELS fit at rate {RATE}: MAC ratio vs measured speedup (batch 1, CPU)")
    axes.legend(fontsize="small", ncol=len(series), loc="upper center")
    axes.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated torchvision names")
    parser.add_argument("--runs", type=at_least(1), default=50, help="timed runs of each network (default 50)")
    parser.add_argument("--warmup", type=at_least(0), default=10,
                        help="untimed runs of each network first (default 10)")
    parser.add_argument("--threads", type=lambda text: [at_least(1)(part) for part in text.split(",")],
                        default=[1, 2], help="comma-separated CPU thread counts (default 1,2)")
    args = parser.parse_args(argv)
    console = Console(width=200)  # the tables are wide; logs are not terminals
    command = "python benchmarks/latency.py " + " ".join(argv if argv is not None else sys.argv[1:])
    start_load = os.getloadavg()[0]
    torch.manual_seed(0)
    # Untimed work (slicing, tracing for export) at the lowest count: on a busy machine, extra
    # OpenMP threads mostly wait for each other. Each measurement sets its own count.
    torch.set_num_threads(min(args.threads))

    timings = [tool_timings(threads) for threads in args.threads]
    for timing in timings:
        console.print(f"{timing['threads']} torch thread(s): split + slice ResNet50 {timing['slice_resnet50_s']:.2f} s "
                      f"(target < 5 s); export + parity check of ResNet18 dense and fit "
                      f"{timing['export_resnet18_s']:.2f} s (target < 30 s)")
    results = {}
    for name in [name.strip() for name in args.models.split(",") if name.strip()]:
        dense = build(name)
        fit = slice_model(dense)
        results[name] = {}
        for threads in args.threads:
            result = measure_latency(dense, fit, INPUT_SHAPE, threads=threads, warmup=args.warmup, runs=args.runs)
            results[name][threads] = result, os.getloadavg()[0]  # and how busy the machine was
        speedups = ", ".join(f"{threads} thr. ORT {result.results[0].onnxruntime.speedup:.2f}x"
                             for threads, (result, _) in results[name].items())
        console.print(f"{name}: {speedups} (MAC ratio {results[name][args.threads[0]][0].macs_ratio:.2f}x)")
    for threads in args.threads:
        console.print(rich_table(f"KELS rate {RATE}, batch 1, {INPUT_SHAPE[1]}x{INPUT_SHAPE[2]}, {threads} thread(s): "
                                 "dense vs fit (ms: median / p90)", HEADER, rows(results, threads)))

    DOCS.mkdir(exist_ok=True)
    write_markdown(DOCS / "benchmarks.md", results, timings, args, command.strip(), (start_load, os.getloadavg()[0]))
    write_chart(DOCS / "benchmarks.png", results, args.threads)
    console.print(f"wrote {DOCS / 'benchmarks.md'} and {DOCS / 'benchmarks.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(run_script("latency", main))
