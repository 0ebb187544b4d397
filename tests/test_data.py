import numpy as np
import pytest
import torch
from PIL import Image

from kecompress.augment import AUGMENTATIONS
from kecompress.data import (class_labels, demo_datasets, image_folder_datasets, input_shape, load_datasets,
                             make_loaders, per_class_subset, stratified_split)

from conftest import error

CLASSES = ["ant", "bee", "cat"]


def write_images(directory, classes=CLASSES, per_class=4, fmt="png"):
    rng = np.random.default_rng(0)
    for name in classes:
        (directory / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, size=(40, 40, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(directory / name / f"{i}.{fmt}")


def labels_of(dataset):
    return [int(dataset[i][1]) for i in range(len(dataset))]


# --- demo data ---------------------------------------------------------------------------

def test_demo_items_are_3_channel_images_of_the_requested_size():
    train, val, classes = demo_datasets(image_size=32, val_fraction=0.2, seed=0)
    assert classes == [str(d) for d in range(10)]
    assert len(train) + len(val) == 1797
    image, label = train[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert label.dtype == torch.int64 and 0 <= int(label) < 10
    assert torch.equal(image[0], image[2])  # grey digits repeated over RGB
    assert input_shape(val) == (3, 32, 32)
    assert demo_datasets(image_size=48)[0][0][0].shape == (3, 48, 48)


def test_demo_split_is_stratified_and_standardised():
    train, val, _ = demo_datasets(val_fraction=0.2, seed=0)
    val_counts = np.bincount(labels_of(val), minlength=10)
    train_counts = np.bincount(labels_of(train), minlength=10)
    assert np.all(np.abs(val_counts / (val_counts + train_counts) - 0.2) < 0.02)
    pixels = torch.stack([train[i][0] for i in range(0, len(train), 7)])
    assert abs(pixels.mean().item()) < 0.2 and 0.7 < pixels.std().item() < 1.2


def test_demo_split_depends_on_seed_only():
    first, second, other = (demo_datasets(seed=s)[1] for s in (0, 0, 1))
    assert torch.equal(first.images, second.images) and torch.equal(first.labels, second.labels)
    assert not torch.equal(first.images, other.images)


def test_load_datasets_without_data_gives_the_demo():
    train, val, classes = load_datasets(None, None, 0.2, 0)
    assert len(classes) == 10 and input_shape(train) == (3, 32, 32)


# --- image folders -----------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["png", "jpg"])
def test_single_directory_holds_out_a_stratified_val_set(tmp_path, fmt):
    write_images(tmp_path, fmt=fmt)
    train, val, classes = image_folder_datasets(tmp_path, image_size=32, val_fraction=0.25, seed=0)
    assert classes == CLASSES
    assert sorted(labels_of(train)) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert sorted(labels_of(val)) == [0, 1, 2]
    image, label = val[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and isinstance(label, int)
    same = image_folder_datasets(tmp_path, image_size=32, val_fraction=0.25, seed=0)[1]
    assert same.indices == val.indices
    assert torch.equal(same[0][0], image)  # the val transform is deterministic


def test_train_and_val_directories(tmp_path):
    write_images(tmp_path / "train")
    write_images(tmp_path / "val", per_class=2)
    train, val, classes = load_datasets(str(tmp_path), 32, 0.2, 0)
    assert classes == CLASSES and len(train) == 12 and len(val) == 6
    assert train[0][0].shape == val[0][0].shape == (3, 32, 32)


def test_hidden_directories_are_not_classes(tmp_path):
    write_images(tmp_path)
    (tmp_path / ".ipynb_checkpoints").mkdir()
    assert image_folder_datasets(tmp_path, image_size=32)[2] == CLASSES


def test_loaders_shuffle_reproducibly(tmp_path):
    write_images(tmp_path)
    train, val, _ = image_folder_datasets(tmp_path, image_size=32, val_fraction=0.25)

    def first_epoch_labels(seed):
        train_loader, _ = make_loaders(train, val, batch_size=5, seed=seed)
        return torch.cat([labels for _, labels in train_loader]).tolist()

    assert first_epoch_labels(3) == first_epoch_labels(3)
    assert len(first_epoch_labels(3)) == 9
    _, val_loader = make_loaders(train, val, batch_size=2, seed=0)
    assert [len(labels) for _, labels in val_loader] == [2, 1]


def test_loaders_drop_a_last_batch_of_one():
    train, val, _ = demo_datasets()
    batch_size = len(train) - 1
    train_loader, _ = make_loaders(train, val, batch_size=batch_size, seed=0)
    assert len(train_loader) == 1


# --- small-data subsets ------------------------------------------------------------------

def test_class_labels_match_the_items(tmp_path):
    write_images(tmp_path)
    train, val, _ = image_folder_datasets(tmp_path, image_size=32, val_fraction=0.25, seed=0)
    assert class_labels(train) == labels_of(train) and class_labels(val) == labels_of(val)
    demo_train, _, _ = demo_datasets(seed=0)
    assert class_labels(demo_train)[:50] == labels_of(torch.utils.data.Subset(demo_train, range(50)))


def test_per_class_subset_takes_that_many_of_every_class_by_seed():
    train, _, _ = demo_datasets(val_fraction=0.5, seed=0)
    small = per_class_subset(train, per_class=7, seed=3)
    assert np.bincount(class_labels(small), minlength=10).tolist() == [7] * 10
    assert per_class_subset(train, 7, seed=3).indices == small.indices
    assert per_class_subset(train, 7, seed=4).indices != small.indices
    assert set(small.indices) <= set(range(len(train)))


def test_per_class_subset_refuses_more_than_a_class_has(tmp_path):
    write_images(tmp_path, per_class=4)
    train, _, classes = image_folder_datasets(tmp_path, image_size=32, val_fraction=0.25, seed=0)
    message = error(per_class_subset, train, 5, 0, classes)
    assert "class ant has 3 training images" in message and "at most 3" in message
    assert "positive integer" in error(per_class_subset, train, 0, 0)


# --- errors ------------------------------------------------------------------------------

def test_missing_root(tmp_path):
    assert "does not exist" in error(image_folder_datasets, tmp_path / "nowhere")


def test_root_is_a_file(tmp_path):
    (tmp_path / "data.zip").write_bytes(b"zip")
    assert "is a file" in error(image_folder_datasets, tmp_path / "data.zip")


def test_empty_root(tmp_path):
    assert "is empty" in error(image_folder_datasets, tmp_path)


def test_no_class_directories(tmp_path):
    Image.new("RGB", (40, 40)).save(tmp_path / "loose.png")
    assert "no class directories" in error(image_folder_datasets, tmp_path)


def test_class_directories_without_images(tmp_path):
    for name in CLASSES:
        (tmp_path / name).mkdir()
        (tmp_path / name / "notes.txt").write_text("not an image")
    assert "Found no valid file" in error(image_folder_datasets, tmp_path)


def test_one_class(tmp_path):
    write_images(tmp_path, classes=["only"])
    assert "at least two classes" in error(image_folder_datasets, tmp_path)


@pytest.mark.parametrize("present, missing", [("train", "val"), ("val", "train")])
def test_train_without_val_and_the_reverse(tmp_path, present, missing):
    write_images(tmp_path / present)
    assert f"has {present}/ but no {missing}/" in error(image_folder_datasets, tmp_path)


def test_train_and_val_classes_differ(tmp_path):
    write_images(tmp_path / "train", classes=["ant", "bee", "cat"])
    write_images(tmp_path / "val", classes=["ant", "bee", "dog"])
    message = error(image_folder_datasets, tmp_path)
    assert "different classes" in message and "cat" in message and "dog" in message


def test_class_with_one_image_cannot_be_split(tmp_path):
    write_images(tmp_path, classes=["ant", "bee"])
    write_images(tmp_path, classes=["lonely"], per_class=1)
    assert "class lonely has only 1 image" in error(image_folder_datasets, tmp_path)


def test_corrupt_image_is_named_when_decoded(tmp_path):
    write_images(tmp_path / "train")
    write_images(tmp_path / "val")
    broken = tmp_path / "train" / "bee" / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff not really a jpeg")
    message = error(image_folder_datasets, tmp_path, image_size=32)  # decoded once, when the data set is made
    assert "cannot decode image" in message and "broken.jpg" in message
    train, _, _ = image_folder_datasets(tmp_path, image_size=32, cache=False)  # or when read
    index = [path for path, _ in train.samples].index(str(broken))
    message = error(train.__getitem__, index)
    assert "cannot decode image" in message and "broken.jpg" in message


def test_images_are_decoded_once_and_augmented_as_the_preset_says(tmp_path):
    write_images(tmp_path / "train")
    write_images(tmp_path / "val")
    kept = {augment: image_folder_datasets(tmp_path, image_size=16, augment=augment) for augment in AUGMENTATIONS}
    for augment, (train, val, _) in kept.items():
        assert train.images is not None and train[0][0].shape == val[0][0].shape == (3, 16, 16)
        torch.manual_seed(0)
        first = train[0][0]
        torch.manual_seed(0)
        assert torch.equal(first, train[0][0])  # seeded: the same draw from the same seed
        assert torch.equal(val[0][0], val[0][0])  # validation is not random
        if augment != "none":
            assert any(not torch.equal(train[0][0], train[0][0]) for _ in range(5))  # training is
    uncached = image_folder_datasets(tmp_path, image_size=16, augment="pad-crop", cache=False)[0]
    torch.manual_seed(1)
    from_files = uncached[2][0]
    torch.manual_seed(1)
    assert torch.equal(from_files, kept["pad-crop"][0][2][0])  # the same images either way


def test_bad_arguments():
    assert "val_fraction" in error(stratified_split, [0, 0, 1, 1], 1.0, 0)
    assert "image size" in error(demo_datasets, image_size=0)
    train, val, _ = demo_datasets()
    assert "batch size" in error(make_loaders, train, val, 0, 0)
