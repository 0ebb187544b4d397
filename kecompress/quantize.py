"""Static INT8 quantisation of exported ONNX networks with onnxruntime, calibrated on training images.

The settings were chosen by measurement on this project's machine (2-core AMD EPYC whose
/proc/cpuinfo lists AVX2, AVX-512 and AVX512-VNNI; onnxruntime 1.32, 1 thread, batch 1, 224 px,
untrained torchvision models at KELS 0.5, 16 calibration inputs, 40 interleaved runs, load
average 2-3): the QDQ and the QOperator format ran equally fast (fit networks: resnet18 3.55 /
3.56 ms, mobilenet_v2 2.13 / 2.08 ms, efficientnet_b0 5.38 / 5.25 ms, against fp32 9.4, 3.0 and
5.6 ms), and per-channel weight scales cost no time but halve the error of depthwise networks
(mobilenet_v2 dense: largest output error 0.031 -> 0.019 of the output's scale). So the files are
QDQ (the format onnxruntime recommends, which other runtimes read too) with per-channel int8
weights and uint8 activations, MinMax calibration. onnxruntime's documentation recommends
``quant_pre_process`` (shape inference and graph optimisation) first; on these graphs it did not
help: the INT8 networks gave identical outputs with and without it and ran as fast (fit networks,
interleaved: resnet18 3.61 / 3.58 ms, mobilenet_v2 2.34 / 2.33, efficientnet_b0 5.27 / 5.23), so
it is not run.

The classifier, the graph's last convolution or matrix product, stays in fp32: quantising it
cost most of the accuracy lost (a ResNet18 KE run on the demo digits at 32 px, 359 validation
images, 256 calibration images: the fit lost 2.8 points of top-1 with it quantised, 0.3 without;
the dense network 25.6 points against 0.6), while its MACs are a tiny share of the network's.
MinMax, Entropy and Percentile calibration, 256 or 1000 calibration images, and QOperator gave
the same 2.8 points there; per-tensor weights and ``reduce_range`` lost more.

These choices were measured once, with scripts that are not in the repository (the latency of
the chosen INT8 networks is what ``kecompress bench --int8`` measures).

On AVX2 CPUs without VNNI onnxruntime's uint8 x int8 kernels can saturate; the accuracy check of
:func:`quantize_pair` is what catches a network that suffers from it.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
import torch
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from torch.utils.data import Dataset, Subset

from .errors import KecompressError
from .export import INPUT_NAME, PAIR_FILES, onnx_session
from .files import atomic_path

CALIBRATION_IMAGES = 256
MAX_ACCURACY_DROP = 1.0  # points of top-1 accuracy the INT8 fit may lose against the fp32 fit
INT8_SETTINGS = {"quant_format": QuantFormat.QDQ, "per_channel": True, "activation_type": QuantType.QUInt8,
                 "weight_type": QuantType.QInt8}
_DYNAMIC_BATCH = 16  # calibration and evaluation batch of a graph whose batch dimension is free


def int8_file_name(file_name: str) -> str:
    """The name of the INT8 file beside an fp32 ONNX file.

    Example:
        >>> int8_file_name("fit.onnx")
        'fit.int8.onnx'
    """
    return f"{Path(file_name).stem}.int8.onnx"


INT8_PAIR_FILES = tuple(int8_file_name(name) for name in PAIR_FILES)


def calibration_subset(dataset: Dataset, images: int = CALIBRATION_IMAGES, seed: int = 0) -> Dataset:
    """A seeded random sample of at most ``images`` items: an image folder lists its images class
    by class, so its first items would all be of one class.

    Example:
        >>> from kecompress.data import demo_datasets
        >>> len(calibration_subset(demo_datasets()[0], images=64))
        64
    """
    if not isinstance(images, int) or images < 1:
        raise KecompressError(f"calibration images must be a positive integer, got {images!r}: pass e.g. 256")
    if len(dataset) == 0:
        raise KecompressError("the calibration data set is empty: add images")
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
    return Subset(dataset, sorted(order[:images].tolist()))


def quantize_int8(fp32_path: str | Path, int8_path: str | Path, calibration: Dataset) -> Path:
    """Write the static INT8 version of ``fp32_path`` to ``int8_path``, calibrated on every item of
    ``calibration`` (see :func:`calibration_subset` to bound it), atomically, and check that
    onnxruntime loads it.

    Args:
        fp32_path: an ONNX file written by :func:`kecompress.export.export_onnx`.
        int8_path: where to write the INT8 file.
        calibration: a data set of ``(image, label)`` items shaped like the graph's input.

    Returns:
        ``int8_path``.

    Raises:
        KecompressError: the calibration images do not fit the graph, or quantisation fails.

    Example:
        >>> import os, tempfile, torch.nn as nn
        >>> from torch.utils.data import TensorDataset
        >>> from kecompress.export import export_onnx
        >>> directory = tempfile.mkdtemp()
        >>> model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(144, 2))
        >>> fp32 = export_onnx(model, os.path.join(directory, "m.onnx"), input_shape=(3, 8, 8))
        >>> images = TensorDataset(torch.randn(8, 3, 8, 8), torch.zeros(8, dtype=torch.long))
        >>> quantize_int8(fp32, os.path.join(directory, "m.int8.onnx"), images).name
        'm.int8.onnx'
    """
    fp32_path, int8_path = Path(fp32_path), Path(int8_path)
    batch_size = _graph_batch_size(fp32_path)
    batches = (images for images, _, _ in image_batches(calibration, batch_size))
    try:
        with atomic_path(int8_path) as temp:
            quantize_static(str(fp32_path), str(temp), _Batches(batches), nodes_to_exclude=_classifier(fp32_path),
                            **INT8_SETTINGS)
            onnx_session(temp)
    except KecompressError:
        raise
    except Exception as error:  # onnxruntime's tools raise plain exceptions of many types
        first_line = str(error).splitlines()[0] if str(error) else ""
        raise KecompressError(f"INT8 quantisation of {fp32_path} failed ({error.__class__.__name__}: {first_line}); "
                              "calibrate with images of the network's input size") from None
    return int8_path


class _Batches(CalibrationDataReader):
    def __init__(self, batches: Iterator[np.ndarray]):
        self._batches = batches

    def get_next(self) -> dict | None:
        batch = next(self._batches, None)
        return None if batch is None else {INPUT_NAME: batch}


def image_batches(dataset: Dataset, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
    """``(images, labels, count)`` batches of exactly ``batch_size`` items, the last one padded with
    zeros (a graph exported with a fixed batch takes no other); ``count`` is how many are real.

    Example:
        >>> from torch.utils.data import TensorDataset
        >>> data = TensorDataset(torch.ones(3, 2), torch.arange(3))
        >>> [(images.shape, count) for images, _, count in image_batches(data, 2)]
        [((2, 2), 2), ((2, 2), 1)]
    """
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    for images, labels in loader:
        count = len(labels)
        images, labels = images.numpy().astype(np.float32), labels.numpy()
        if count < batch_size:
            images = np.concatenate([images, np.zeros((batch_size - count, *images.shape[1:]), np.float32)])
        yield images, labels, count


def onnx_top1(path: str | Path, dataset: Dataset) -> float:
    """Top-1 accuracy (a fraction) of the ONNX classifier at ``path`` on ``dataset``, in onnxruntime.

    Example:
        >>> import os, tempfile, torch.nn as nn
        >>> from torch.utils.data import TensorDataset
        >>> from kecompress.export import export_onnx
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
        >>> path = export_onnx(model, os.path.join(tempfile.mkdtemp(), "m.onnx"), input_shape=(4,))
        >>> images = torch.randn(5, 4)
        >>> onnx_top1(path, TensorDataset(images, model(images).argmax(1)))
        1.0
    """
    session = onnx_session(path)
    correct = total = 0
    for images, labels, count in image_batches(dataset, _graph_batch_size(path)):
        outputs = session.run(None, {INPUT_NAME: images})[0][:count]
        correct += int((outputs.argmax(axis=1) == labels).sum())
        total += count
    if total == 0:
        raise KecompressError("the validation data set is empty: add images")
    return correct / total


@dataclass(frozen=True)
class Int8Export:
    """What :func:`quantize_pair` wrote and measured: the INT8 files, and the fit's top-1 accuracy
    (fractions) in fp32 and INT8 when validation data were given (else None)."""

    paths: list[Path]
    fit_fp32_accuracy: float | None
    fit_int8_accuracy: float | None

    @property
    def accuracy_drop_points(self) -> float | None:
        """How many points of top-1 accuracy the INT8 fit loses against the fp32 fit.

        Example:
            >>> Int8Export([], 0.95, 0.94).accuracy_drop_points
            1.0
        """
        if self.fit_fp32_accuracy is None:
            return None
        return round(100 * (self.fit_fp32_accuracy - self.fit_int8_accuracy), 6)


def quantize_pair(directory: str | Path, calibration: Dataset, validation: Dataset | None = None,
                  max_accuracy_drop: float = MAX_ACCURACY_DROP) -> Int8Export:
    """Quantise ``directory``'s dense.onnx and fit.onnx to dense.int8.onnx and fit.int8.onnx.

    Both are written to temporary files first. With ``validation`` data, the fp32 and INT8 fit
    are evaluated on it in onnxruntime, and when INT8 loses more than ``max_accuracy_drop``
    points of top-1 accuracy nothing is written and the reason is raised; else, and without
    validation data, both files are moved into place.

    Args:
        directory: where :func:`kecompress.export.export_pair` wrote the fp32 files.
        calibration: the calibration images (e.g. :func:`calibration_subset` of the training set).
        validation: held-out ``(image, label)`` items for the accuracy check, or None to skip it.
        max_accuracy_drop: the most points of top-1 accuracy the INT8 fit may lose.

    Returns:
        An :class:`Int8Export`.

    Raises:
        KecompressError: a missing fp32 file, failed quantisation, or too large an accuracy drop.

    Example:
        >>> import tempfile, torchvision, kecompress
        >>> from torch.utils.data import TensorDataset
        >>> from kecompress.export import export_pair
        >>> dense = torchvision.models.resnet18(num_classes=2)
        >>> x = torch.randn(1, 3, 32, 32)
        >>> fit = kecompress.slice_fit(dense, kecompress.split(dense, "kels", 0.5, x), x)
        >>> directory = tempfile.mkdtemp()
        >>> _ = export_pair(dense, fit, directory, input_shape=(3, 32, 32))
        >>> images = TensorDataset(torch.randn(4, 3, 32, 32), torch.zeros(4, dtype=torch.long))
        >>> [path.name for path in quantize_pair(directory, images).paths]
        ['dense.int8.onnx', 'fit.int8.onnx']
    """
    directory = Path(directory)
    _check_drop(max_accuracy_drop)
    missing = [name for name in PAIR_FILES if not (directory / name).is_file()]
    if missing:
        raise KecompressError(f"{directory} has no {' or '.join(missing)}: export the fp32 networks first "
                              "(kecompress.export.export_pair)")
    paths = [directory / name for name in INT8_PAIR_FILES]
    with ExitStack() as stack:  # the files appear only once both exist and the fit passed the check
        temps = [stack.enter_context(atomic_path(path)) for path in paths]
        for fp32_name, temp in zip(PAIR_FILES, temps):
            quantize_int8(directory / fp32_name, temp, calibration)
        if validation is None:
            return Int8Export(paths, None, None)
        result = Int8Export(paths, onnx_top1(directory / PAIR_FILES[1], validation), onnx_top1(temps[1], validation))
        if result.accuracy_drop_points > max_accuracy_drop:
            raise KecompressError(
                f"the INT8 fit loses {result.accuracy_drop_points:.2f} points of top-1 accuracy on {len(validation)} "
                f"validation images (fp32 {result.fit_fp32_accuracy:.2%}, INT8 {result.fit_int8_accuracy:.2%}), "
                f"more than the {max_accuracy_drop:g} allowed: no INT8 file written; calibrate on more images "
                "or allow more (--max-accuracy-drop)")
    return result


def _check_drop(max_accuracy_drop) -> None:
    if isinstance(max_accuracy_drop, bool) or not isinstance(max_accuracy_drop, (int, float)) \
            or not 0 <= max_accuracy_drop <= 100:
        raise KecompressError(f"the largest accuracy drop is in points from 0 to 100, got {max_accuracy_drop!r}: "
                              f"pass e.g. {MAX_ACCURACY_DROP:g}")


def _classifier(path: Path) -> list[str]:
    """The name of the graph's last convolution or matrix product (in topological order), as a list."""
    compute = [node.name for node in onnx.load(str(path)).graph.node if node.op_type in ("Conv", "Gemm", "MatMul")]
    return compute[-1:]


def _graph_batch_size(path: str | Path) -> int:
    """The fixed batch size of the graph's input, or a default where it is free."""
    batch = onnx_session(path).get_inputs()[0].shape[0]
    return batch if isinstance(batch, int) and batch > 0 else _DYNAMIC_BATCH
