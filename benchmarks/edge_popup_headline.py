"""Benchmark: edge-popup's headline at our scale. A Wide ResNet-style network on the bundled digits,
its sub-network found by edge-popup at half the weights kept (frozen random weights, learned
scores), against the same architecture trained normally (target: within 2 points), and the time
of a score step against a plain training step (target <= 1.30).

Both sides train for the same epochs with SGD (momentum 0.9) and a cosine schedule from the same
learning rate; the normal side with weight decay --weight-decay, edge-popup without (Ramanujan
et al.'s settings). The network is WRN-(6n+4)-k in Zagoruyko & Komodakis's layout (three stages of
basic blocks, 16k, 32k, 64k channels), small enough for a CPU. Every figure is measured in this
run; it exits 0 whatever it measures.

Usage:
    .venv/bin/python benchmarks/edge_popup_headline.py [--width 4] [--blocks 1] [--epochs 30] [--seeds 2]
        [--image-size 32] [--rate 0.5] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, installed or not

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from common import at_least, machine, machine_line, run_script  # noqa: E402
from kecompress import Callback, Evolution, Split, split as make_split  # noqa: E402
from kecompress.config import TrainingConfig  # noqa: E402
from kecompress.data import demo_datasets, make_loaders  # noqa: E402
from kecompress.edge_popup import apply_edge_popup  # noqa: E402

TARGETS = {"accuracy_gap_points": 2.0, "step_ratio": 1.30}


class BasicBlock(nn.Module):
    def __init__(self, inputs: int, outputs: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(inputs, outputs, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(outputs)
        self.conv2 = nn.Conv2d(outputs, outputs, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(outputs)
        self.shortcut = nn.Sequential() if stride == 1 and inputs == outputs else nn.Sequential(
            nn.Conv2d(inputs, outputs, 1, stride, bias=False), nn.BatchNorm2d(outputs))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def wide_resnet(width: int, blocks: int, num_classes: int = 10) -> nn.Module:
    """WRN-(6*blocks+4)-width for small images (no bias in the classifier, as hidden-networks' models)."""
    layers, inputs = [nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU()], 16
    for stage, channels in enumerate((16 * width, 32 * width, 64 * width)):
        for block in range(blocks):
            layers.append(BasicBlock(inputs, channels, 2 if stage and not block else 1))
            inputs = channels
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(inputs, num_classes, bias=False))


class StepTimes(Callback):
    """The wall time of every training step (its batch loaded, forward, backward, optimizer step),
    measured from the end of the previous step or the start of the epoch."""

    def __init__(self):
        self.seconds, self._last = [], None

    def on_epoch_start(self, loop, generation, epoch):
        self._last = time.perf_counter()

    def on_step_end(self, loop, loss, samples):
        now = time.perf_counter()
        self.seconds.append(now - self._last)
        self._last = now


def train(side: str, options: dict, seed: int) -> tuple[float, list[float], int]:
    """Test accuracy, step times and trained-parameter count of one side for one seed."""
    train_set, val_set, _ = demo_datasets(options["image_size"], seed=0)
    train_loader, val_loader = make_loaders(train_set, val_set, options["batch_size"], seed)
    torch.manual_seed(seed)
    model = wide_resnet(options["width"], options["blocks"])
    example = torch.zeros(1, 3, options["image_size"], options["image_size"])
    if side == "edge-popup":
        apply_edge_popup(model, "edge-popup", options["rate"])
        the_split, decay = Split("edge-popup", options["rate"], seed), 0.0
    else:
        the_split, decay = make_split(model, "wels", options["rate"], seed=seed), options["weight_decay"]
    config = TrainingConfig(generations=1, epochs=options["epochs"], lr=options["lr"], weight_decay=decay, seed=seed)
    times = StepTimes()
    loop = Evolution(model, the_split, train_loader, val_loader, config, example_inputs=example, callbacks=[times],
                     fit_batchnorm="inherited")
    [record] = loop.run()
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # The normal side's network is its dense one; edge-popup's is the sub-network its scores found.
    return (record.dense if side == "normal" else record.fit), times.seconds, trained


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=at_least(1), default=4, help="WRN widening factor k")
    parser.add_argument("--blocks", type=at_least(1), default=1, help="basic blocks per stage")
    parser.add_argument("--epochs", type=at_least(1), default=30)
    parser.add_argument("--seeds", type=at_least(1), default=2)
    parser.add_argument("--image-size", type=at_least(8), default=32)
    parser.add_argument("--batch-size", type=at_least(1), default=64)
    parser.add_argument("--rate", type=float, default=0.5, help="fraction of the weights edge-popup keeps")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--weight-decay", type=float, default=5e-4, help="of the normal side")
    parser.add_argument("--threads", type=at_least(1), default=1)
    options = vars(parser.parse_args(argv))
    torch.set_num_threads(options["threads"])
    results = {side: [train(side, options, seed) for seed in range(options["seeds"])]
               for side in ("normal", "edge-popup")}
    accuracy = {side: [100 * acc for acc, _, _ in runs] for side, runs in results.items()}
    step = {side: statistics.median(s for _, times, _ in runs for s in times) for side, runs in results.items()}
    gap = statistics.fmean(accuracy["normal"]) - statistics.fmean(accuracy["edge-popup"])
    ratio = step["edge-popup"] / step["normal"]
    print(f"machine: {machine_line(machine(options['threads']))}")
    print(f"WRN-{6 * options['blocks'] + 4}-{options['width']} on the digits at {options['image_size']}px, "
          f"{options['epochs']} epochs, batch {options['batch_size']}, lr {options['lr']}, seeds "
          f"0..{options['seeds'] - 1}; edge-popup keeps {options['rate']:.0%} of every layer's weights")
    for side in ("normal", "edge-popup"):
        values = ", ".join(f"{a:.1f}" for a in accuracy[side])
        print(f"  {side:10s} test accuracy {statistics.fmean(accuracy[side]):.1f}% ({values}); "
              f"median step {1000 * step[side]:.0f} ms; parameters trained {results[side][0][2]:,}")
    print(f"accuracy gap, normal - edge-popup: {gap:+.1f} points (target <= {TARGETS['accuracy_gap_points']:.0f}): "
          + ("pass" if gap <= TARGETS["accuracy_gap_points"] else "FAIL"))
    print(f"step time, score step / plain step: {ratio:.2f} (target <= {TARGETS['step_ratio']:.2f}): "
          + ("pass" if ratio <= TARGETS["step_ratio"] else "FAIL"))
    return 0


if __name__ == "__main__":
    sys.exit(run_script("edge_popup_headline", main))
