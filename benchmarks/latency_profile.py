"""Where a KELS fit's onnxruntime time goes: dense vs fit per kind of operation, against the MACs.

onnxruntime's per-node profiler (``SessionOptions.enable_profiling``) times every node of the
optimised graphs, dense and fit runs interleaved, and each node's median is kept. Nodes are
grouped by kind (kecompress.node_kinds: 1x1, small 1x1, kxk, depthwise and grouped convolutions, squeeze-excitation, element-wise,
pooling, concatenation, layout reorders, the classifier), and each kind's time ratio (dense /
fit) is set beside its size ratio: MACs, or for work without MACs the output's elements. MACs
are counted from the shapes onnxruntime ran, padding included: its blocked (NCHWc) kernels
round channel counts up to their block, 16 floats on AVX-512, 8 on AVX2. The fit's time had
each kind shrunk as much as its size shows what the MAC ratio alone allows (depthwise
convolutions shrink with the channels, not their square); the time a kind loses against that
is where the rest of the efficiency goes. The convolutions that lose the most against their
own MAC ratio are listed below.

Prints markdown tables, the figures of docs/benchmarks.md's analysis.

    .venv/bin/python benchmarks/latency_profile.py mobilenet_v2 --align 16     # 20-40 seconds on 2 cores
    .venv/bin/python benchmarks/latency_profile.py regnet_x_400mf --runs 100 --threads 2
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import onnxruntime as ort
import torch

import kecompress
from common import at_least, machine, machine_line, markdown_table, run_script
from kecompress.bench import count_macs_params, describe_cpu_flags
from kecompress.export import INPUT_NAME, export_onnx
from kecompress.models import build_model
from kecompress.node_kinds import CONVS, kind_and_macs

RATE, INPUT_SHAPE = 0.5, (3, 224, 224)


def session(path: Path, threads: int, prefix: str) -> ort.InferenceSession:
    """A session as kecompress.bench times one (all optimisations, one inter-op thread, the spin
    stopped after each run), profiling every node."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.add_session_config_entry("session.force_spinning_stop", "1")
    options.enable_profiling, options.profile_file_prefix = True, prefix
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def shapes(described: list[dict]) -> list[list[int]]:
    """The shapes of a profile event's ``input_type_shape`` or ``output_type_shape``."""
    return [next(iter(entry.values())) for entry in described]


def node_times(profile: Path) -> dict[str, dict]:
    """Per node of a profile: kind, MACs as run, output elements, median kernel time (ms) over
    the runs (the median leaves the warm-up runs and disturbed runs out), and the weight shape."""
    nodes = {}
    for event in json.loads(profile.read_text()):
        if event.get("cat") != "Node" or not event["name"].endswith("_kernel_time"):
            continue
        name, args = event["name"][: -len("_kernel_time")], event["args"]
        if name not in nodes:
            inputs, outputs = shapes(args.get("input_type_shape", [])), shapes(args.get("output_type_shape", []))
            kind, macs = kind_and_macs(args["op_name"], inputs, outputs)
            nodes[name] = {"op": args["op_name"], "kind": kind, "macs": macs, "durations": [],
                           "elements": sum(math.prod(shape) for shape in outputs),
                           "weight": inputs[1] if args["op_name"] in CONVS else None}
        nodes[name]["durations"].append(event["dur"] / 1e3)
    for node in nodes.values():
        node["ms"] = statistics.median(node.pop("durations"))
    return nodes


def profile_pair(dense, fit, threads: int, warmup: int, runs: int) -> tuple[dict, dict]:
    """Node times of the dense and the fit graph, runs interleaved as kecompress.bench times them."""
    feed = {INPUT_NAME: torch.randn(1, *INPUT_SHAPE, generator=torch.Generator().manual_seed(0)).numpy()}
    with tempfile.TemporaryDirectory() as directory:
        sessions = []
        for name, model in (("dense", dense), ("fit", fit)):
            path = export_onnx(model, Path(directory) / f"{name}.onnx", INPUT_SHAPE)
            sessions.append(session(path, threads, str(Path(directory) / name)))
        for _ in range(warmup + runs):
            for running in sessions:
                running.run(None, feed)
        return tuple(node_times(Path(running.end_profiling())) for running in sessions)


def ratio(dense: float, fit: float) -> str:
    return f"{dense / fit:.2f}x" if fit and dense else "-"


def at_ratio(dense_ms: float, dense_size: int, fit_size: int, unit: str) -> float:
    """The fit's ms had it shrunk as much as its size: dense ms x fit size / dense size; for
    element counts at most the dense ms (the fit's extra layout reorders are overhead, not size)."""
    if not dense_size:
        return 0.0
    return dense_ms * (fit_size / dense_size if unit == "MACs" else min(1.0, fit_size / dense_size))


def group_rows(dense: dict, fit: dict) -> tuple[list[list[str]], float]:
    """Per kind: ms dense and fit, their ratio, the size ratio (MACs, or output elements where
    there are none: what memory-bound work scales with), the fit's ms at that ratio
    (:func:`at_ratio`), the ms it loses against that, and its share of the fit's time; a total
    row; and the fit's total ms had every kind shrunk so."""
    totals = {which: defaultdict(lambda: {"ms": 0.0, "macs": 0, "elements": 0}) for which in ("dense", "fit")}
    for which, nodes in (("dense", dense), ("fit", fit)):
        for node in nodes.values():
            total = totals[which][node["kind"]]
            for key in total:
                total[key] += node[key] or 0
    fit_total = sum(node["ms"] for node in fit.values())
    rows, ideal_total = [], 0.0
    for kind in sorted(totals["dense"].keys() | totals["fit"].keys(), key=lambda kind: -totals["dense"][kind]["ms"]):
        mine, slim = totals["dense"][kind], totals["fit"][kind]
        unit = "MACs" if mine["macs"] else "elements"
        ideal = at_ratio(mine["ms"], mine[unit.lower()], slim[unit.lower()], unit)
        ideal_total += ideal
        rows.append([kind, f"{mine['ms']:.3f}", f"{slim['ms']:.3f}", ratio(mine["ms"], slim["ms"]),
                     f"{unit} {ratio(mine[unit.lower()], slim[unit.lower()])}", f"{ideal:.3f}",
                     f"{slim['ms'] - ideal:+.3f}", f"{slim['ms'] / fit_total:.0%}"])
    dense_total = sum(node["ms"] for node in dense.values())
    rows.append(["all nodes", f"{dense_total:.3f}", f"{fit_total:.3f}", ratio(dense_total, fit_total),
                 f"MACs {ratio(macs_as_run(dense), macs_as_run(fit))}", f"{ideal_total:.3f}",
                 f"{fit_total - ideal_total:+.3f}", "100%"])
    return rows, ideal_total


def macs_as_run(nodes: dict) -> int:
    return sum(node["macs"] or 0 for node in nodes.values())


def worst_rows(dense: dict, fit: dict, count: int) -> list[list[str]]:
    """The convolutions and matrix products (by node name, in both graphs) whose fit loses the
    most time against its dense node shrunk by its own MAC ratio."""
    shared = [name for name, node in fit.items() if node["macs"] and (dense.get(name) or {}).get("macs")]

    def lost(name: str) -> float:
        return fit[name]["ms"] - at_ratio(dense[name]["ms"], dense[name]["macs"], fit[name]["macs"], "MACs")

    return [[name, fit[name]["kind"], f"{dense[name]['weight'] or '-'} -> {fit[name]['weight'] or '-'}",
             f"{dense[name]['ms']:.3f}", f"{fit[name]['ms']:.3f}", ratio(dense[name]["ms"], fit[name]["ms"]),
             ratio(dense[name]["macs"], fit[name]["macs"]), f"{lost(name):+.3f}"]
            for name in sorted(shared, key=lost, reverse=True)[:count]]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="torchvision architecture")
    parser.add_argument("--align", type=at_least(1), default=1, help="KELS alignment, 1 the paper's rule (default 1)")
    parser.add_argument("--threads", type=at_least(1), default=1, help="onnxruntime intra-op threads (default 1)")
    parser.add_argument("--runs", type=at_least(1), default=40, help="profiled runs of each network (default 40)")
    parser.add_argument("--warmup", type=at_least(0), default=10, help="runs before them (default 10)")
    parser.add_argument("--worst", type=at_least(0), default=8, help="nodes to list that lose the most (default 8)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(1)  # export and slicing only: onnxruntime runs with --threads
    dense = build_model(args.model, num_classes=1000).eval()
    example = torch.randn(1, *INPUT_SHAPE)
    fit = kecompress.slice_fit(dense, kecompress.split(dense, "kels", RATE, example, align=args.align), example)
    macs_ratio = count_macs_params(dense, INPUT_SHAPE)[0] / count_macs_params(fit, INPUT_SHAPE)[0]
    dense_nodes, fit_nodes = profile_pair(dense, fit, args.threads, args.warmup, args.runs)
    described = machine(args.threads)
    print(f"{args.model}, KELS {RATE} align {args.align}, {args.threads} thread(s), batch 1, {INPUT_SHAPE[1]} px, "
          f"median node times over {args.runs} interleaved runs; MAC ratio (torch-pruning's count) "
          f"{macs_ratio:.2f}x; {machine_line(described)}, onnxruntime {described['onnxruntime']}, "
          f"{describe_cpu_flags(described['cpu_flags'])}; load average {described['load_average']}\n")
    rows, ideal = group_rows(dense_nodes, fit_nodes)
    print("\n".join(markdown_table(["kind", "dense ms", "fit ms", "dense / fit", "size ratio (as run)",
                                    "fit ms at size ratio", "fit ms lost", "share of fit"], rows)))
    dense_ms, fit_ms = (sum(node["ms"] for node in nodes.values()) for nodes in (dense_nodes, fit_nodes))
    print(f"Measured: speedup {dense_ms / fit_ms:.2f}x, efficiency {dense_ms / fit_ms / macs_ratio:.2f}. Every kind "
          f"at its size ratio: speedup {dense_ms / ideal:.2f}x, efficiency {dense_ms / ideal / macs_ratio:.2f}.\n")
    if args.worst:
        print("\n".join(markdown_table(
            ["node", "kind", "weight as run, dense -> fit", "dense ms", "fit ms", "dense / fit", "MAC ratio",
             "fit ms lost"], worst_rows(dense_nodes, fit_nodes, args.worst))))
    return 0


if __name__ == "__main__":
    sys.exit(run_script("latency_profile", main))
