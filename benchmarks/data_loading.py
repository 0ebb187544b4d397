"""Benchmark: images per second of ``kecompress evolve`` on an ImageFolder of JPEG files, with
images decoded on every read (as before) and decoded once and kept in memory (now).

It writes ``--images`` photo-sized JPEGs (random smooth textures, ``--photo-size``) as an
ImageFolder, builds the run as ``kecompress evolve`` does at ``--image-size`` (default 224) with
each data path, and measures, interleaved: an epoch of the evolve loop, and the same epoch's
loading and augmentation alone (iterating the loader). Target: loading under 10% of an epoch with
the in-memory path. Every figure is measured in this run.

Usage:
    .venv/bin/python benchmarks/data_loading.py [--images 96] [--image-size 224] [--rounds 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, installed or not

from common import Rounds, at_least, machine, machine_line, rich_table, run_script, timed, watch  # noqa: E402

TARGET_LOADING_SHARE = 0.10


def write_photos(root: Path, images: int, size: tuple[int, int]) -> None:
    """``images`` JPEGs of two classes: smooth random textures, about as costly to decode as photos."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for index in range(images):
        folder = root / ("a" if index % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        coarse = rng.integers(0, 256, size=(size[1] // 16, size[0] // 16, 3), dtype=np.uint8)
        Image.fromarray(coarse).resize(size, Image.Resampling.BICUBIC).save(folder / f"{index}.jpg", quality=90)


def build_loop(root: Path, options: dict, cache: bool):
    """The run ``kecompress evolve resnet18 --data ROOT`` builds, its images decoded as ``cache`` says."""
    from kecompress import experiment
    from kecompress.augment import default_augmentation
    from kecompress.config import RunConfig, TrainingConfig
    from kecompress.data import image_folder_datasets

    size = options["image_size"]
    config = RunConfig(model=options["model"], data=str(root), image_size=size, augment=default_augmentation(size),
                       batch_size=options["batch_size"], training=TrainingConfig(generations=1, epochs=100))
    data = image_folder_datasets(root, size, 0.2, 0, config.augment, cache=cache)
    loop = experiment.build(config, data)
    loop.start_optimizer()
    return loop


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--images", type=at_least(8), default=96, help="JPEG files written (a fifth held out)")
    parser.add_argument("--photo-size", type=at_least(16), nargs=2, default=[500, 375], metavar=("W", "H"))
    parser.add_argument("--image-size", type=at_least(8), default=224)
    parser.add_argument("--batch-size", type=at_least(1), default=32)
    parser.add_argument("--rounds", type=at_least(1), default=2, help="clean rounds wanted of every side")
    parser.add_argument("--quiet-cpus", type=at_least(0, float), default=0.25)
    options = vars(parser.parse_args(argv))
    import torch

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory(prefix="kecompress-photos-") as directory:
        root = Path(directory)
        write_photos(root, options["images"], tuple(options["photo_size"]))
        loops = {"decoded on every read": build_loop(root, options, cache=False),
                 "decoded once, in memory": build_loop(root, options, cache=True)}
        sides = {}
        for name, loop in loops.items():
            sides[f"{name}: epoch"] = lambda index, loop=loop: timed(lambda: loop.train_epoch(1, index))
            sides[f"{name}: loading alone"] = lambda index, loop=loop: timed(lambda: [None for _ in loop.train_loader])
        for side in sides.values():
            side(0)  # warm-up
        rounds = Rounds(list(sides), wanted=options["rounds"], max_rounds=3 * options["rounds"], time_limit=900,
                        quiet_cpus=options["quiet_cpus"], paired=False)
        rounds.run(lambda side, index: watch(lambda: sides[side](index + 1)))
        images = len(next(iter(loops.values())).train_loader.dataset)
    rows, shares = [], {}
    for name in loops:
        epoch, loading = (statistics.median(rounds.results(f"{name}: {part}")) for part in ("epoch", "loading alone"))
        shares[name] = loading / epoch
        rows.append([name, f"{epoch:.2f} s", f"{images / epoch:.1f}", f"{loading:.2f} s", f"{loading / epoch:.1%}",
                     "noisy" if rounds.noisy(f"{name}: epoch") else "clean"])
    from rich.console import Console

    Console(width=140).print(rich_table(
        f"{options['model']} at {options['image_size']} px, {images} training JPEGs of "
        f"{options['photo_size'][0]}x{options['photo_size'][1]}, batch {options['batch_size']}, 2 threads",
        ["images", "epoch (median)", "images/s", "loading alone", "loading / epoch", "rounds"], rows))
    share = shares["decoded once, in memory"]
    print(f"loading share of an epoch, in memory: {share:.1%} (target < {TARGET_LOADING_SHARE:.0%}: "
          f"{'pass' if share < TARGET_LOADING_SHARE else 'MISS'}); machine: {machine_line(machine(2))}, "
          f"other processes used {rounds.other_cpus() or 0:.2f} CPUs on average")
    return 0


if __name__ == "__main__":
    sys.exit(run_script("data_loading.py", main))
