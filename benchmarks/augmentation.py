"""Benchmark: which augmentation suits small, low-resolution images? Test accuracy of one network
trained with each of kecompress's presets (kecompress/augment.py) on an ImageFolder.

For each seed, ``--per-class`` training images a class (all with 0) of ``--data`` at
``--image-size``, the network trained for ``--epochs`` epochs (one generation: augmentation, not
KE, is measured) with ``resized-crop`` (what every image folder got before), ``pad-crop`` and
``none``; test accuracy on the folder's ``val/`` images, paired per seed against
``resized-crop``, a verdict only beyond two standard errors. Runs ``--jobs`` at a time, one
thread each.

Usage (Animal-Shape, 28-px silhouettes, written by benchmarks/animal_shapes.py):
    .venv/bin/python benchmarks/augmentation.py --data /tmp/animals --image-size 32
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, installed or not

from common import at_least, machine, machine_line, mean_std, paired, rich_table, run_script  # noqa: E402

BEFORE = "resized-crop"


def run_job(settings: dict) -> float:
    """Train one network with one augmentation and seed (one torch thread); its test accuracy."""
    import torch

    from kecompress import experiment
    from kecompress.config import RunConfig, TrainingConfig
    from kecompress.data import per_class_subset

    torch.set_num_threads(1)
    seed = settings["seed"]
    config = RunConfig(model=settings["model"], data=settings["data"], image_size=settings["image_size"],
                       augment=settings["augment"], seed=seed, batch_size=32,
                       training=TrainingConfig(generations=1, epochs=settings["epochs"], seed=seed))
    train, test, classes = experiment.load_data(config)
    if settings["per_class"]:
        train = per_class_subset(train, settings["per_class"], seed)
    return experiment.build(config, (train, test, classes)).run()[-1].dense


def main(argv: list[str] | None = None) -> int:
    from kecompress.augment import AUGMENTATIONS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="an ImageFolder with train/ and val/")
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--image-size", type=at_least(8), default=32)
    parser.add_argument("--per-class", type=at_least(0), default=0)
    parser.add_argument("--epochs", type=at_least(1), default=30)
    parser.add_argument("--seeds", type=at_least(2), default=3)
    parser.add_argument("--jobs", type=at_least(1), default=2)
    options = vars(parser.parse_args(argv))
    options["data"] = str(Path(options["data"]).resolve())
    started = time.perf_counter()
    jobs = [{**options, "augment": augment, "seed": seed} for augment in AUGMENTATIONS for seed in range(options["seeds"])]
    with ProcessPoolExecutor(max_workers=options["jobs"]) as pool:
        accuracies = list(pool.map(run_job, jobs))
    by_augment = {augment: [accuracy for job, accuracy in zip(jobs, accuracies) if job["augment"] == augment]
                  for augment in AUGMENTATIONS}
    rows = []
    for augment, values in by_augment.items():
        difference, verdict = paired(values, by_augment[BEFORE]) if augment != BEFORE else ("", "")
        rows.append([augment, mean_std(values), difference, verdict])
    from rich.console import Console

    Console(width=140).print(rich_table(
        f"{options['model']} at {options['image_size']} px, {options['epochs']} epochs, {options['seeds']} seeds, "
        f"{Path(options['data']).name}: test accuracy (%)", ["augmentation", "mean ± std", f"− {BEFORE} (points)",
                                                            "verdict"], rows))
    print(f"machine: {machine_line(machine(1))}; {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(run_script("augmentation.py", main))
