"""benchmarks/animal_shapes.py: writes the ImageFolder from the wheel, and runs no code from it."""

import gzip
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "animal_shapes.py"
IMAGES = "animal_mnist/data/Animal_MNIST/animal_data_version_3.gz"
LABELS = "animal_mnist/data/Animal_MNIST/animal_label_version_3.gz"


def fake_wheel(path: Path, images, labels) -> Path:
    """A wheel laid out like animal-mnist 0.4's, holding the given pickled objects."""
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr(IMAGES, gzip.compress(pickle.dumps(images)))
        wheel.writestr(LABELS, gzip.compress(pickle.dumps(labels)))
    return path


def run(*argv):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, argv)], capture_output=True, text=True, timeout=60)


def test_it_writes_a_seeded_sample_of_every_class(tmp_path):
    labels = np.repeat(np.arange(10), 6)
    images = (np.arange(60)[:, None, None] * np.ones((60, 28, 28))).astype(np.uint8)  # image i is all i
    wheel = fake_wheel(tmp_path / "animal.whl", images, labels)
    result = run(wheel, tmp_path / "out", "--train", "2", "--val", "3")
    assert result.returncode == 0, result.stderr
    for name in ("bear", "zebra"):
        train, val = sorted((tmp_path / "out" / "train" / name).iterdir()), sorted((tmp_path / "out" / "val" / name).iterdir())
        assert len(train) == 2 and len(val) == 3 and not {p.name for p in train} & {p.name for p in val}
        for path in train + val:
            pixels = np.asarray(Image.open(path))
            assert pixels.shape == (28, 28) and (pixels == int(path.stem)).all()  # the file is its image
    assert all(int(p.stem) // 6 == 9 for p in (tmp_path / "out" / "train" / "zebra").iterdir())  # label 9
    again = run(wheel, tmp_path / "out2", "--train", "2", "--val", "3")
    assert again.returncode == 0
    assert sorted(p.name for p in (tmp_path / "out2" / "train" / "cat").iterdir()) == \
        sorted(p.name for p in (tmp_path / "out" / "train" / "cat").iterdir())  # the same seed, the same sample


class Payload:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_a_pickle_that_names_anything_but_numpy_is_refused(tmp_path):
    wheel = fake_wheel(tmp_path / "evil.whl", Payload(), np.zeros(3, dtype=np.int64))
    result = run(wheel, tmp_path / "out")
    assert result.returncode == 2 and "posix.system" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "pwned").exists() and not Path("pwned").exists()


def test_an_existing_output_directory_is_left_alone(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("mine")
    result = run(tmp_path / "any.whl", tmp_path / "out")
    assert result.returncode == 2 and "exists" in result.stderr
    assert (tmp_path / "out" / "mine.txt").read_text() == "mine"
