"""Write the Animal-Shape data set as an ImageFolder: a second small, real data set for the benchmarks.

Animal-Shape (Sina Mohammadi, MIT licence) is 10,000 silhouettes of 10 animals at 28x28, 1,000
a class, shipped inside the ``animal-mnist`` wheel on PyPI as two gzipped numpy pickles. This
script reads them straight from the wheel, without installing it (it would pull in tensorflow)
and without running code from the pickles (only numpy's array reconstruction may be called),
and writes a seeded sample of each class as ``OUT/train/<animal>/*.png`` and ``OUT/val/...``.

    pip download --no-deps animal-mnist==0.4 -d /tmp/wheels
    python benchmarks/animal_shapes.py /tmp/wheels/animal_mnist-0.4-py3-none-any.whl /tmp/animals
    python benchmarks/scoreboard.py --question generations --data /tmp/animals --per-class 0 --out-dir docs/animals
"""

from __future__ import annotations

import argparse
import gzip
import io
import pickle
import sys
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

# The label order of the data set's description: Bear, Bird, Cat, Cow, Dog, Elephant, Giraffe,
# Horse, Sheep, Zebra (checked by eye on a sample of each label).
CLASSES = ["bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra"]
IMAGES = "animal_mnist/data/Animal_MNIST/animal_data_version_3.gz"
LABELS = "animal_mnist/data/Animal_MNIST/animal_label_version_3.gz"
# What the pickles may name: numpy's array reconstruction, nothing else.
ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
           ("numpy", "ndarray"), ("numpy", "dtype")}


class NumpyOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in ALLOWED:
            raise pickle.UnpicklingError(f"the file names {module}.{name}, which is not a numpy array part")
        return super().find_class(module, name)


def read_array(wheel: zipfile.ZipFile, member: str) -> np.ndarray:
    with wheel.open(member) as packed:
        return np.asarray(NumpyOnlyUnpickler(io.BytesIO(gzip.decompress(packed.read()))).load())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("wheel", type=Path, help="animal_mnist-0.4-py3-none-any.whl (pip download --no-deps)")
    parser.add_argument("out", type=Path, help="directory to write train/ and val/ into (must not exist)")
    parser.add_argument("--train", type=int, default=30, help="training images per class (default 30)")
    parser.add_argument("--val", type=int, default=100, help="validation images per class (default 100)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample (default 0)")
    args = parser.parse_args(argv)
    if args.out.exists():
        print(f"animal_shapes: {args.out} exists: choose a new directory", file=sys.stderr)
        return 2
    if not (0 < args.train and 0 < args.val and args.train + args.val <= 1000):
        print("animal_shapes: --train and --val must be positive and at most 1000 together", file=sys.stderr)
        return 2
    try:
        with zipfile.ZipFile(args.wheel) as wheel:
            images, labels = read_array(wheel, IMAGES), read_array(wheel, LABELS)
    except (OSError, KeyError, zipfile.BadZipFile, pickle.UnpicklingError) as error:
        print(f"animal_shapes: cannot read {args.wheel} ({error}): pass the animal-mnist 0.4 wheel", file=sys.stderr)
        return 2
    generator = np.random.default_rng(args.seed)
    for label, name in enumerate(CLASSES):
        members = generator.permutation(np.flatnonzero(labels == label))
        for part, chosen in (("train", members[:args.train]), ("val", members[args.train:args.train + args.val])):
            directory = args.out / part / name
            directory.mkdir(parents=True, exist_ok=True)
            for index in chosen:
                Image.fromarray(images[index].astype(np.uint8)).save(directory / f"{index}.png")
    print(f"wrote {args.out}: {args.train} training and {args.val} validation images of each of {len(CLASSES)} animals")
    return 0


if __name__ == "__main__":
    sys.exit(main())
