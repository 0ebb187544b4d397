"""What a learned shape costs to find, and whether its latency follows its MACs.

1. The time to choose a learned split (importance of every coupled group and the global ranking
   to the uniform fit's MACs, checked by cutting the fit out and counting): ResNet50 at 224 px by
   default; target under 10 s on this CPU.
2. onnxruntime fp32 latency, 1 thread, of the uniform KELS fit and of a global-width fit at the
   same MACs (channels by BatchNorm scale; the scales randomised, as a trained network's differ):
   each fit's efficiency (speed-up over the dense network divided by its MAC ratio), and the
   global fit's over the uniform's; target at least 0.9 at --align 8.

    .venv/bin/python benchmarks/learned_shape.py                                      # both: about 5 min on 2 cores
    .venv/bin/python benchmarks/learned_shape.py --models resnet18 --runs 20 --skip-cost   # a short check
"""

from __future__ import annotations

import argparse
import time

import torch
from rich.console import Console

import kecompress
from common import at_least, machine, machine_line, rich_table, run_script
from kecompress.bench import count_macs_params, measure_latency
from kecompress.models import build_model
from kecompress.shape import SELECTIONS, learned_split

COST_TARGET_SECONDS = 10.0
EFFICIENCY_TARGET = 0.9


def randomise_scales(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """BatchNorm scales drawn in [0.05, 1.5], as training leaves them unequal (at initialisation all are 1)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.weight.copy_(torch.rand(module.weight.shape, generator=generator) * 1.45 + 0.05)
    return model.eval()


def cost(args) -> list[list[str]]:
    rows = []
    model = randomise_scales(build_model(args.cost_model, 1000, args.cost_size))
    example = torch.randn(1, 3, args.cost_size, args.cost_size)
    for select in args.selections:
        started = time.perf_counter()
        split = learned_split(model, args.rate, select=select, widths="global", align=args.align,
                              example_inputs=example)
        seconds = time.perf_counter() - started
        rows.append([args.cost_model, f"{args.cost_size}", select, f"{split.fit_macs:.3f}", f"{seconds:.1f}",
                     "yes" if seconds < COST_TARGET_SECONDS else "NO"])
    return rows


def latency(args) -> list[list[str]]:
    rows = []
    shape = (3, args.image_size, args.image_size)
    example = torch.randn(1, *shape)
    for name in args.models:
        dense = randomise_scales(build_model(name, 1000, args.image_size))
        uniform = kecompress.split(dense, "kels", args.rate, example_inputs=example, align=args.align)
        learned = learned_split(dense, args.rate, select="bn-scale", widths="global", align=args.align,
                                example_inputs=example)
        efficiencies = []
        for label, split in (("uniform", uniform), ("global", learned)):
            fit = kecompress.slice_fit(dense, split, example_inputs=example)
            result = measure_latency(dense, fit, shape, runtimes=("onnxruntime",), threads=1, warmup=args.warmup,
                                     runs=args.runs)
            ort = result.results[0].onnxruntime
            efficiencies.append(ort.efficiency)
            share = count_macs_params(fit, shape)[0] / count_macs_params(dense, shape)[0]
            rows.append([name, label, f"{share:.3f}", f"{ort.dense_median_ms:.2f}", f"{ort.fit_median_ms:.2f}",
                         f"{ort.speedup:.2f}", f"{ort.efficiency:.2f}", ""])
        relative = efficiencies[1] / efficiencies[0]
        rows[-1][-1] = f"{relative:.2f} ({'yes' if relative >= EFFICIENCY_TARGET else 'NO'})"
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--models", type=lambda text: text.split(","), default=["resnet18", "mobilenet_v2"])
    parser.add_argument("--image-size", type=at_least(32), default=224)
    parser.add_argument("--rate", type=float, default=0.5)
    parser.add_argument("--align", type=at_least(1), default=8)
    parser.add_argument("--runs", type=at_least(1), default=100)
    parser.add_argument("--warmup", type=at_least(0), default=10)
    parser.add_argument("--cost-model", default="resnet50")
    parser.add_argument("--cost-size", type=at_least(32), default=224)
    parser.add_argument("--selections", type=lambda text: text.split(","), default=["magnitude", "bn-scale"],
                        help=f"of {', '.join(SELECTIONS[1:3])} (taylor needs data)")
    parser.add_argument("--skip-cost", action="store_true")
    parser.add_argument("--skip-latency", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    console = Console()
    console.print(machine_line(machine(1)))
    if not args.skip_cost:
        console.print(rich_table(f"choosing a global-width split (target under {COST_TARGET_SECONDS:.0f} s)",
                         ["model", "px", "select", "fit MACs share", "seconds", "under target"], cost(args)))
    if not args.skip_latency:
        console.print(rich_table(f"onnxruntime fp32, 1 thread, align {args.align}, {args.image_size} px "
                         f"(global over uniform efficiency: target at least {EFFICIENCY_TARGET})",
                         ["model", "widths", "fit MACs share", "dense ms", "fit ms", "speed-up", "efficiency",
                          "global / uniform"], latency(args)))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_script("learned_shape", main))
