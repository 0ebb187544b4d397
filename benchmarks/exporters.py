"""Benchmark: torch's two ONNX exporters, TorchScript and dynamo, on KELS dense and fit networks:
export time, graph nodes, parity with PyTorch, and onnxruntime latency (1 thread, batch 1), the
two graphs of each network timed interleaved. The figures of docs/cli.md's exporter table.

Usage:
    .venv/bin/python benchmarks/exporters.py [--models resnet18 mobilenet_v2 efficientnet_b0] [--image-size 224]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, installed or not

from common import at_least, machine, machine_line, rich_table, run_script, timed  # noqa: E402

EXPORTERS = ("torchscript", "dynamo")


def measure(model, name: str, directory: Path, options: dict) -> list[list[str]]:
    """One row per exporter of ``model``: export seconds, nodes, parity, median and p90 latency."""
    import onnx
    import torch

    from kecompress.bench import time_interleaved
    from kecompress.export import INPUT_NAME, check_onnx_parity, export_onnx, onnx_session

    shape = (3, options["image_size"], options["image_size"])
    sample = torch.randn(1, *shape, generator=torch.Generator().manual_seed(0))
    paths, seconds = {}, {}
    for exporter in EXPORTERS:
        paths[exporter] = directory / f"{name}-{exporter}.onnx"
        seconds[exporter] = timed(lambda: export_onnx(model, paths[exporter], shape, exporter=exporter))
    feed = {INPUT_NAME: sample.numpy()}
    sessions = [onnx_session(paths[exporter], threads=1, config={"session.force_spinning_stop": "1"})
                for exporter in EXPORTERS]
    times = time_interleaved([lambda session=session: session.run(None, feed) for session in sessions],
                              options["warmup"], options["runs"])
    return [[name, exporter, f"{seconds[exporter]:.1f}", str(len(onnx.load(paths[exporter]).graph.node)),
             f"{check_onnx_parity(model, paths[exporter], sample):.1e}", f"{statistics.median(ms):.2f}",
             f"{statistics.quantiles(ms, n=10)[-1]:.2f}"] for exporter, ms in zip(EXPORTERS, times)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "mobilenet_v2", "efficientnet_b0"])
    parser.add_argument("--image-size", type=at_least(8), default=224)
    parser.add_argument("--warmup", type=at_least(0), default=5)
    parser.add_argument("--runs", type=at_least(2), default=50)
    options = vars(parser.parse_args(argv))
    import torch

    import kecompress
    from kecompress.models import build_model

    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory(prefix="kecompress-exporters-") as directory:
        for arch in options["models"]:
            torch.manual_seed(0)
            dense = build_model(arch, 1000).eval()
            example = torch.zeros(1, 3, options["image_size"], options["image_size"])
            fit = kecompress.slice_fit(dense, kecompress.split(dense, "kels", 0.5, example_inputs=example),
                                       example_inputs=example).eval()
            for which, model in (("dense", dense), ("fit", fit)):
                rows += measure(model, f"{arch} {which}", Path(directory), options)
    from rich.console import Console

    Console(width=140).print(rich_table(
        f"ONNX exporters, {options['image_size']} px, batch 1, onnxruntime 1 thread",
        ["network", "exporter", "export s", "nodes", "max |onnx - torch| / scale", "median ms", "p90 ms"], rows))
    print(f"machine: {machine_line(machine(1))}, load average {machine(1)['load_average']}")
    return 0


if __name__ == "__main__":
    sys.exit(run_script("exporters.py", main))
