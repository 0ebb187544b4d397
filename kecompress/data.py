"""Data sets for Knowledge Evolution: ImageFolder directories and the bundled digits demo.

Both give ``(train, val, class_names)`` with items ``(image CHW float32, label int64)``, sized
for torchvision's ImageNet architectures, and split reproducibly from a seed.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from torchvision import datasets
from torchvision.transforms.functional import pil_to_tensor

from .augment import CROP_SCALE, check_augmentation, default_augmentation, stored_size, train_transform, val_transform
from .errors import KecompressError

DEMO_IMAGE_SIZE = 32
FOLDER_IMAGE_SIZE = 224


def demo_datasets(image_size: int = DEMO_IMAGE_SIZE, val_fraction: float = 0.2,
                  seed: int = 0) -> tuple[Dataset, Dataset, list[str]]:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes), no download.

    Images are scaled up to ``image_size`` and repeated over 3 channels, so that torchvision's
    ImageNet architectures accept them, and standardised with the training pixels' mean and
    standard deviation. The validation set is a seeded, stratified ``val_fraction`` of each class.

    Example:
        >>> train, val, classes = demo_datasets(image_size=32, seed=0)
        >>> len(train) + len(val), classes[:3], train[0][0].shape
        (1797, ['0', '1', '2'], torch.Size([3, 32, 32]))
    """
    from sklearn.datasets import load_digits  # imported here: only the demo needs scikit-learn

    _check_image_size(image_size)
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1)  # (N, 1, 8, 8)
    labels = torch.tensor(digits.target, dtype=torch.int64)
    train_indices, val_indices = stratified_split(labels.tolist(), val_fraction, seed)
    train_pixels = images[train_indices]
    images = (images - train_pixels.mean()) / train_pixels.std()
    class_names = [str(digit) for digit in digits.target_names]
    return (_DigitsDataset(images[train_indices], labels[train_indices], image_size),
            _DigitsDataset(images[val_indices], labels[val_indices], image_size),
            class_names)


class _DigitsDataset(Dataset):
    # Resizes one image at a time: 1,797 images stored at 224x224x3 would take over 1 GB.
    def __init__(self, images: torch.Tensor, labels: torch.Tensor, image_size: int):
        self.images, self.labels, self.image_size = images, labels, image_size

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = F.interpolate(self.images[index:index + 1], size=self.image_size,
                              mode="bilinear", align_corners=False)
        return image[0].expand(3, -1, -1).contiguous(), self.labels[index]


def image_folder_datasets(root: str | Path, image_size: int = FOLDER_IMAGE_SIZE, val_fraction: float = 0.2,
                          seed: int = 0, augment: str | None = None, crop_scale=CROP_SCALE,
                          cache: bool | None = None) -> tuple[Dataset, Dataset, list[str]]:
    """Training and validation sets from a directory of images, one subdirectory per class.

    ``root`` holds either ``train/`` and ``val/``, each with the same class directories, or
    the class directories themselves; then a seeded, stratified ``val_fraction`` of each class
    is held out for validation. Training images get ``augment`` (:mod:`kecompress.augment`; by
    default chosen from ``image_size``), validation images their shorter side at ``image_size``
    and the centre square, both ImageNet-normalised.

    KE reads the same few hundred images thousands of times, so every image is decoded once and
    kept in memory, resized (:func:`kecompress.augment.stored_size`), and augmented as a tensor
    each time it is read; ``cache=False`` decodes on every read instead, as it does by default when
    the images would take more than 2 GiB. An image that cannot be decoded raises a
    :class:`KecompressError` naming the file.

    Raises:
        KecompressError: a missing or empty ``root``, no class directories or images, fewer than
            two classes, ``train/`` without ``val/`` or the reverse, or differing class sets.

    Example:
        >>> import tempfile, os
        >>> from PIL import Image
        >>> root = tempfile.mkdtemp()
        >>> for name in ["cat", "dog"]:
        ...     os.makedirs(os.path.join(root, name))
        ...     for i in range(3):
        ...         Image.new("RGB", (40, 40)).save(os.path.join(root, name, f"{i}.png"))
        >>> train, val, classes = image_folder_datasets(root, image_size=32)
        >>> len(train), len(val), classes, train[0][0].shape
        (4, 2, ['cat', 'dog'], torch.Size([3, 32, 32]))
    """
    _check_image_size(image_size)
    augment = augment or default_augmentation(image_size)
    check_augmentation(augment, crop_scale)
    root = Path(root)
    if not root.exists():
        raise KecompressError(f"data directory {root} does not exist: check the --data path")
    if not root.is_dir():
        raise KecompressError(f"data path {root} is a file: pass a directory with one "
                              "subdirectory of images per class")
    training, validation = train_transform(augment, image_size, crop_scale), val_transform(image_size)
    stored = stored_size(augment, image_size)

    has_train, has_val = (root / "train").is_dir(), (root / "val").is_dir()
    if has_train != has_val:
        present, missing = ("train", "val") if has_train else ("val", "train")
        raise KecompressError(
            f"{root} has {present}/ but no {missing}/: add {missing}/ with the same class "
            f"directories, or rename {present}/ if it is a class")
    if has_train:
        train_folder, val_folder = _image_folder(root / "train"), _image_folder(root / "val")
        if train_folder.classes != val_folder.classes:
            only_train = sorted(set(train_folder.classes) - set(val_folder.classes))
            only_val = sorted(set(val_folder.classes) - set(train_folder.classes))
            raise KecompressError(
                f"{root}: train/ and val/ have different classes (only in train/: {only_train or 'none'}, "
                f"only in val/: {only_val or 'none'}): give both the same class directories")
        return (DecodedImages(train_folder.samples, stored, training, cache),
                DecodedImages(val_folder.samples, stored, validation, cache), train_folder.classes)

    folder = _image_folder(root)
    train_indices, val_indices = stratified_split(folder.targets, val_fraction, seed, folder.classes)
    images = DecodedImages(folder.samples, stored, training, cache)  # decoded once for both subsets
    return Subset(images, train_indices), Subset(images.with_transform(validation), val_indices), folder.classes


class DecodedImages(Dataset):
    """Images of ``(path, label)`` samples, decoded once and kept in memory as uint8 tensors with
    their shorter side at ``stored`` pixels (``cache``; by default unless that would take more
    than 2 GiB), then ``transform``-ed each time one is read.

    Example:
        >>> import tempfile, os
        >>> from PIL import Image
        >>> path = os.path.join(tempfile.mkdtemp(), "a.png")
        >>> Image.new("RGB", (60, 40)).save(path)
        >>> images = DecodedImages([(path, 1)], stored=20, transform=lambda image: image)
        >>> images[0][0].shape, images[0][1]
        (torch.Size([3, 20, 30]), 1)
    """

    MAX_CACHE_BYTES = 2 * 2 ** 30

    def __init__(self, samples: list[tuple[str, int]], stored: int, transform, cache: bool | None = None):
        self.samples, self.stored, self.transform = list(samples), stored, transform
        self.targets = [label for _, label in self.samples]
        if cache is None:  # a square image at the stored size, at least
            cache = len(self.samples) * 3 * stored * stored <= self.MAX_CACHE_BYTES
        self.images = [self._decode(path) for path, _ in self.samples] if cache else None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        image = self.images[index] if self.images is not None else self._decode(path)
        return self.transform(image), label

    def with_transform(self, transform) -> "DecodedImages":
        """The same images (not decoded again), read through another transform."""
        other = copy.copy(self)
        other.transform = transform
        return other

    def _decode(self, path: str) -> torch.Tensor:
        image = load_rgb_image(path)
        scale = self.stored / min(image.size)
        if scale < 1:  # never enlarged: the transforms resize on tensors where they must
            image = image.resize((max(round(image.width * scale), 1), max(round(image.height * scale), 1)),
                                 Image.Resampling.BILINEAR, reducing_gap=None)
        return pil_to_tensor(image)


def _class_names(directory: Path) -> list[str]:
    # Hidden directories (.ipynb_checkpoints, .git) are never classes.
    return sorted(entry.name for entry in directory.iterdir()
                  if entry.is_dir() and not entry.name.startswith("."))


class _ImageFolder(datasets.ImageFolder):
    def find_classes(self, directory):
        classes = _class_names(Path(directory))
        return classes, {name: index for index, name in enumerate(classes)}


def _image_folder(directory: Path) -> datasets.ImageFolder:
    classes = _class_names(directory)
    if not classes:
        what = "is empty" if not any(directory.iterdir()) else "has no class directories"
        raise KecompressError(f"data directory {directory} {what}: put the images in one "
                              "subdirectory per class, e.g. cat/1.jpg and dog/2.jpg")
    if len(classes) == 1:
        raise KecompressError(f"data directory {directory} has a single class ({classes[0]}): "
                              "KE needs at least two classes, add a directory of images per class")
    try:
        return _ImageFolder(directory)  # its file list; the images are decoded by DecodedImages
    except FileNotFoundError as error:  # torchvision's check: a class directory without images
        raise KecompressError(f"data directory {directory}: {error}; put images in every class "
                              "directory or remove the empty ones") from None


def load_rgb_image(path: str) -> Image.Image:
    """Decode an image file as RGB, naming the file if it cannot be decoded.

    Example:
        >>> import tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "a.png")
        >>> Image.new("L", (4, 4)).save(path)
        >>> load_rgb_image(path).mode
        'RGB'
    """
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise KecompressError(f"cannot decode image {path} ({error}): "
                              "remove or replace the file") from None


def without_augmentation(train: Dataset, val: Dataset) -> Dataset:
    """The training images of :func:`load_datasets` read as its validation images are (resized and
    centre-cropped, no random crop or flip): what calibrating an INT8 network needs, since it
    must see images as inference will. The bundled demo has no augmentation and is returned as is.

    Example:
        >>> import tempfile, os
        >>> root = tempfile.mkdtemp()
        >>> for name in ["cat", "dog"]:
        ...     os.makedirs(os.path.join(root, name))
        ...     for i in range(3):
        ...         Image.new("RGB", (40, 30)).save(os.path.join(root, name, f"{i}.png"))
        >>> train, val, _ = image_folder_datasets(root, image_size=32)
        >>> calibration = without_augmentation(train, val)
        >>> len(calibration), calibration.dataset.transform is val.dataset.transform
        (4, True)
    """
    if isinstance(train, Subset) and isinstance(val, Subset):
        return Subset(without_augmentation(train.dataset, val.dataset), train.indices)
    if hasattr(train, "transform") and hasattr(val, "transform"):  # an image folder, whatever its class
        unaugmented = copy.copy(train)
        unaugmented.transform = val.transform
        return unaugmented
    return train


def stratified_split(labels: list[int], val_fraction: float, seed: int,
                     class_names: list[str] | None = None) -> tuple[list[int], list[int]]:
    """Indices of a seeded train/validation split holding out ``val_fraction`` of every class.

    Each class keeps at least one image on each side, so every class needs two or more;
    ``class_names`` (indexed by label) only serve to name a class that has fewer.

    Example:
        >>> stratified_split([0, 0, 0, 0, 1, 1, 1, 1], val_fraction=0.25, seed=0)
        ([1, 2, 3, 5, 6, 7], [0, 4])
    """
    if not 0 < val_fraction < 1:
        raise KecompressError(f"val_fraction must be between 0 and 1, got {val_fraction}: pass e.g. 0.2")
    generator = torch.Generator().manual_seed(seed)
    train, val = [], []
    for label in sorted(set(labels)):
        members = torch.tensor([i for i, other in enumerate(labels) if other == label])
        if len(members) < 2:
            name = class_names[label] if class_names else label
            raise KecompressError(f"class {name} has only {len(members)} image: holding out a "
                                  "validation set needs at least two per class, add images or "
                                  "provide train/ and val/ directories")
        members = members[torch.randperm(len(members), generator=generator)]
        held_out = min(max(1, round(val_fraction * len(members))), len(members) - 1)
        val += members[:held_out].tolist()
        train += members[held_out:].tolist()
    return sorted(train), sorted(val)


def class_labels(dataset: Dataset) -> list[int]:
    """The class label of every item of ``dataset``, read without decoding images where possible.

    Knows the bundled demo, image folders (decoded or torchvision's) and ``Subset`` of them; any other data
    set is read item by item.

    Example:
        >>> train, val, _ = demo_datasets(seed=0)
        >>> len(class_labels(val)), sorted(set(class_labels(val)))[:3]
        (359, [0, 1, 2])
    """
    if isinstance(dataset, Subset):
        parent = class_labels(dataset.dataset)
        return [parent[index] for index in dataset.indices]
    if isinstance(dataset, _DigitsDataset):
        return dataset.labels.tolist()
    if isinstance(dataset, (datasets.DatasetFolder, DecodedImages)):
        return list(dataset.targets)
    return [int(dataset[index][1]) for index in range(len(dataset))]


def per_class_subset(dataset: Dataset, per_class: int, seed: int,
                     class_names: list[str] | None = None) -> Subset:
    """A seeded sample of ``per_class`` items of every class: a small-data training set.

    The same seed gives the same items; a class with fewer than ``per_class`` items is refused.
    ``class_names`` (indexed by label) only serve to name such a class.

    Example:
        >>> train, _, _ = demo_datasets(seed=0)
        >>> small = per_class_subset(train, per_class=5, seed=0)
        >>> len(small), sorted(set(class_labels(small)))[:3]
        (50, [0, 1, 2])
    """
    if not isinstance(per_class, int) or per_class < 1:
        raise KecompressError(f"images per class must be a positive integer, got {per_class!r}: pass e.g. 20")
    labels = class_labels(dataset)
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for label in sorted(set(labels)):
        members = torch.tensor([i for i, other in enumerate(labels) if other == label])
        if len(members) < per_class:
            name = class_names[label] if class_names else label
            raise KecompressError(f"class {name} has {len(members)} training images, fewer than the "
                                  f"{per_class} per class asked for: ask for at most {len(members)}")
        chosen += members[torch.randperm(len(members), generator=generator)[:per_class]].tolist()
    return Subset(dataset, sorted(chosen))


def load_datasets(data: str | Path | None, image_size: int | None = None, val_fraction: float = 0.2,
                  seed: int = 0, augment: str | None = None, crop_scale=CROP_SCALE) -> tuple[Dataset, Dataset, list[str]]:
    """The image folder at ``data`` (augmented with ``augment``, see :func:`image_folder_datasets`),
    or the digits demo, which is not augmented, when ``data`` is None.

    ``image_size`` None means 224 for an image folder and 32 for the demo.

    Example:
        >>> train, val, classes = load_datasets(None)
        >>> len(classes)
        10
    """
    if data is None:
        return demo_datasets(image_size or DEMO_IMAGE_SIZE, val_fraction, seed)
    return image_folder_datasets(data, image_size or FOLDER_IMAGE_SIZE, val_fraction, seed, augment, crop_scale)


def make_loaders(train: Dataset, val: Dataset, batch_size: int, seed: int, workers: int = 0, rank: int = 0,
                 world_size: int = 1, pin_memory: bool = False) -> tuple[DataLoader, DataLoader]:
    """Data loaders; the training order (and workers' augmentation seeds) follow ``seed``.

    ``workers`` processes load and augment in the background (each epoch's start them afresh, so
    that their random numbers follow the epoch's seed and a resumed run draws what an
    uninterrupted one does); ``pin_memory`` for a CUDA device.

    With ``world_size`` above 1 (under torchrun, see :mod:`kecompress.distributed`), the loaders
    of process ``rank``: a seeded ``DistributedSampler`` gives it every ``world_size``-th image of
    each shuffle (``batch_size`` is per process), and it evaluates every ``world_size``-th
    validation image from its rank, each image once, so that metrics summed over the ranks are
    those of the whole validation set.

    Example:
        >>> train, val, _ = demo_datasets()
        >>> train_loader, val_loader = make_loaders(train, val, batch_size=32, seed=0)
        >>> next(iter(train_loader))[0].shape
        torch.Size([32, 3, 32, 32])
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise KecompressError(f"batch size must be a positive integer, got {batch_size!r}: pass e.g. 32")
    sampler = None
    if world_size > 1:
        sampler = DistributedSampler(train, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
        val = Subset(val, range(rank, len(val), world_size))
    # A last training batch of one image breaks BatchNorm in training mode; drop only that one.
    images = len(sampler) if sampler is not None else len(train)
    drop_last = images > batch_size and images % batch_size == 1
    train_loader = DataLoader(train, batch_size=batch_size, shuffle=sampler is None, sampler=sampler,
                              drop_last=drop_last, num_workers=workers, pin_memory=pin_memory,
                              generator=torch.Generator().manual_seed(seed))
    val_loader = DataLoader(val, batch_size=batch_size, shuffle=False, num_workers=workers, pin_memory=pin_memory)
    return train_loader, val_loader


def input_shape(dataset: Dataset) -> tuple[int, ...]:
    """The shape (C, H, W) of one input of ``dataset``, e.g. for an example batch.

    Example:
        >>> input_shape(demo_datasets(image_size=32)[1])
        (3, 32, 32)
    """
    if len(dataset) == 0:
        raise KecompressError("the data set is empty: add images")
    return tuple(dataset[0][0].shape)


def _check_image_size(image_size: int) -> None:
    if not isinstance(image_size, int) or image_size < 1:
        raise KecompressError(f"image size must be a positive integer, got {image_size!r}: pass e.g. 224")
