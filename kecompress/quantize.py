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

INT8 is not faster everywhere: the conversions around a quantised node cost more than INT8 saves
on nodes with little work per pixel (depthwise convolutions, squeeze-excitation, small 1x1
convolutions; ``benchmarks/latency_profile.py`` times the kinds). So :func:`quantize_no_slower`
times the INT8 network against the fp32 one on the machine it runs on and keeps those kinds in
fp32, one after the other, until INT8 is at least as fast; if it never is, no INT8 file is written.
"""

from __future__ import annotations

import logging
import shutil
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import onnx
import torch
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from torch.utils.data import Dataset, Subset

from .errors import KecompressError
from .export import INPUT_NAME, PAIR_FILES, onnx_session
from .files import atomic_path, staged_directory
from .node_kinds import CONV_KINDS, graph_node_kinds

CALIBRATION_IMAGES = 256
MAX_ACCURACY_DROP = 1.0  # points of top-1 accuracy the INT8 fit may lose against the fp32 fit
INT8_SETTINGS = {"quant_format": QuantFormat.QDQ, "per_channel": True, "activation_type": QuantType.QUInt8,
                 "weight_type": QuantType.QInt8}
_DYNAMIC_BATCH = 16  # calibration and evaluation batch of a graph whose batch dimension is free
# The kinds of convolutions kept in fp32, in this order, while the INT8 network runs slower than the
# fp32 one (names of kecompress.node_kinds.CONV_KINDS).
LOSING_KINDS = ("depthwise", "squeeze-excitation", "small-1x1")
# Each candidate INT8 network and the fp32 one are timed, interleaved, for about this long: at small
# inputs hundreds of runs, enough for medians that rank them; 1 thread, as a deployment's worst case.
SPEED_CHECK_SECONDS = 0.3


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


def check_keep_fp32(kinds) -> tuple[str, ...]:
    """The kinds of convolutions to keep in fp32, from ``"depthwise,small-1x1"`` (or a list), checked
    against :data:`~kecompress.node_kinds.CONV_KINDS`; ``"none"`` or ``""`` quantises every kind.

    Example:
        >>> check_keep_fp32("depthwise, squeeze-excitation")
        ('depthwise', 'squeeze-excitation')
        >>> check_keep_fp32("none")
        ()
    """
    names = kinds.split(",") if isinstance(kinds, str) else list(kinds)
    names = [str(name).strip() for name in names if str(name).strip() not in ("", "none")]
    unknown = [name for name in names if name not in CONV_KINDS]
    if unknown:
        raise KecompressError(f"unknown kind of convolution {unknown[0]!r} to keep in fp32: choose from "
                              f"{', '.join(CONV_KINDS)} (comma-separated), or none")
    return tuple(dict.fromkeys(names))


def quantize_int8(fp32_path: str | Path, int8_path: str | Path, calibration: Dataset,
                  keep_fp32: Sequence[str] = ()) -> Path:
    """Write the static INT8 version of ``fp32_path`` to ``int8_path``, calibrated on every item of
    ``calibration`` (see :func:`calibration_subset` to bound it), atomically, and check that
    onnxruntime loads it.

    Args:
        fp32_path: an ONNX file written by :func:`kecompress.export.export_onnx`.
        int8_path: where to write the INT8 file.
        calibration: a data set of ``(image, label)`` items shaped like the graph's input.
        keep_fp32: kinds of convolutions left in fp32 (:func:`check_keep_fp32`); the classifier always is.

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
    kinds = {CONV_KINDS[name] for name in check_keep_fp32(keep_fp32)}
    excluded = _classifier(fp32_path)
    if kinds:
        excluded += [node for node, kind in graph_node_kinds(fp32_path).items() if kind in kinds]
    root = logging.getLogger()
    root.addFilter(_not_pre_processing_advice)
    try:
        with atomic_path(int8_path) as temp:
            quantize_static(str(fp32_path), str(temp), _Batches(batches), nodes_to_exclude=excluded,
                            **INT8_SETTINGS)
            onnx_session(temp)
    except KecompressError:
        raise
    except Exception as error:  # onnxruntime's tools raise plain exceptions of many types
        first_line = str(error).splitlines()[0] if str(error) else ""
        raise KecompressError(f"INT8 quantisation of {fp32_path} failed ({error.__class__.__name__}: {first_line}); "
                              "calibrate with images of the network's input size") from None
    finally:
        root.removeFilter(_not_pre_processing_advice)
    return int8_path


@dataclass(frozen=True)
class Int8Speed:
    """How fast an INT8 network ran against its fp32 network (median ms, interleaved), which kinds
    of convolutions it keeps in fp32, and whether its file was written."""

    kept_fp32: tuple[str, ...]
    fp32_ms: float
    int8_ms: float
    written: bool

    @property
    def speedup(self) -> float:
        """fp32 time over INT8 time: at least 1 for a written file (unless the user chose its kinds).

        Example:
            >>> Int8Speed((), 2.0, 1.0, True).speedup
            2.0
        """
        return self.fp32_ms / self.int8_ms

    def describe(self, name: str) -> str:
        """One line on the INT8 file ``name``.

        Example:
            >>> Int8Speed(("depthwise",), 2.0, 1.6, True).describe("fit.int8.onnx")
            'fit.int8.onnx: 1.25x the fp32 speed (onnxruntime, 1 thread), depthwise convolutions kept in fp32'
        """
        kept = f"{', '.join(self.kept_fp32)} convolutions kept in fp32" if self.kept_fp32 else "every kind quantised"
        timed = "onnxruntime, 1 thread"
        if self.written:
            return f"{name}: {self.speedup:.2f}x the fp32 speed ({timed}), {kept}"
        return (f"{name} not written: INT8 ran at {self.speedup:.2f}x the fp32 speed on this CPU ({self.int8_ms:.3f} "
                f"against {self.fp32_ms:.3f} ms, {timed}) at best, with {kept}; deploy the fp32 file, or choose the kinds "
                "to keep in fp32 with --int8-keep-fp32")


def time_fp32_int8(fp32_path: str | Path, int8_path: str | Path, images: np.ndarray,
                   seconds: float = SPEED_CHECK_SECONDS) -> tuple[float, float]:
    """Median milliseconds of the fp32 and the INT8 network on ``images`` in onnxruntime (1 thread,
    the thread's CPU time), interleaved as ``kecompress bench`` times them, for about ``seconds``.

    Example:
        >>> import os, tempfile, torch.nn as nn
        >>> from kecompress.export import export_onnx
        >>> path = export_onnx(nn.Conv2d(3, 4, 3), os.path.join(tempfile.mkdtemp(), "c.onnx"), input_shape=(3, 8, 8))
        >>> [ms > 0 for ms in time_fp32_int8(path, path, np.zeros((1, 3, 8, 8), np.float32), seconds=0.01)]
        [True, True]
    """
    from .bench import _TIMING_CONFIG, time_interleaved  # bench imports this module

    sessions = [onnx_session(path, threads=1, config=_TIMING_CONFIG) for path in (fp32_path, int8_path)]
    runs = [lambda session=session: session.run(None, {INPUT_NAME: images}) for session in sessions]
    # At 1 thread onnxruntime runs the network on the calling thread: its CPU time leaves out the
    # time other processes take the core away, which the wall clock would count against either side.
    first = time_interleaved(runs, warmup=2, runs=3, clock="thread")
    pair_ms = sum(statistics.median(times) for times in first)
    times = time_interleaved(runs, warmup=0, runs=max(5, int(seconds * 1e3 / max(pair_ms, 1e-3))), clock="thread")
    return statistics.median(times[0]), statistics.median(times[1])


def quantize_no_slower(fp32_path: str | Path, int8_path: str | Path, calibration: Dataset,
                       keep_fp32: Sequence[str] | None = None,
                       timer: Callable[[Path, Path, np.ndarray], tuple[float, float]] | None = None) -> Int8Speed:
    """Quantise ``fp32_path`` to ``int8_path`` (:func:`quantize_int8`) so that it runs at least as fast.

    The INT8 network is timed against the fp32 one (``timer``, default :func:`time_fp32_int8`,
    on the first calibration batch). While it is slower, the kinds of :data:`LOSING_KINDS` that the
    graph has are kept in fp32 one at a time, each kept only if it made INT8 faster; the fastest
    candidate is written if it is at least as fast as fp32, else nothing is. ``keep_fp32`` (kinds,
    see :func:`check_keep_fp32`) overrides the search: those kinds stay fp32 and the file is written,
    however fast.

    Returns:
        An :class:`Int8Speed`.

    Example:
        >>> import os, tempfile, torch.nn as nn
        >>> from torch.utils.data import TensorDataset
        >>> from kecompress.export import export_onnx
        >>> directory = tempfile.mkdtemp()
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3, groups=8), nn.Flatten(), nn.Linear(288, 2))
        >>> fp32 = export_onnx(model, os.path.join(directory, "m.onnx"), input_shape=(3, 10, 10))
        >>> images = TensorDataset(torch.randn(4, 3, 10, 10), torch.zeros(4, dtype=torch.long))
        >>> slower_unless_depthwise = lambda fp32, int8, x: (1.0, 0.9 if "depthwise" in str(int8) else 1.1)
        >>> quantize_no_slower(fp32, os.path.join(directory, "m.int8.onnx"), images, timer=slower_unless_depthwise)
        Int8Speed(kept_fp32=('depthwise',), fp32_ms=1.0, int8_ms=0.9, written=True)
    """
    fp32_path, int8_path = Path(fp32_path), Path(int8_path)
    timer = timer or time_fp32_int8
    images = next(image_batches(calibration, _graph_batch_size(fp32_path)))[0]
    present = set(graph_node_kinds(fp32_path).values())
    with tempfile.TemporaryDirectory(dir=int8_path.parent) as directory:
        def measured(kept: tuple[str, ...]) -> tuple[Int8Speed, Path]:
            # the candidate's file is named by its kinds, which an injected timer may read
            path = Path(directory) / f"{'+'.join(kept) or 'all'}.int8.onnx"
            quantize_int8(fp32_path, path, calibration, kept)
            return Int8Speed(kept, *timer(fp32_path, path, images), written=True), path

        if keep_fp32 is not None:
            best, best_path = measured(check_keep_fp32(keep_fp32))
        else:
            best, best_path = measured(())
            for kind in LOSING_KINDS:
                if best.int8_ms <= best.fp32_ms:
                    break
                if CONV_KINDS[kind] not in present:
                    continue
                candidate, path = measured(best.kept_fp32 + (kind,))
                if candidate.int8_ms / candidate.fp32_ms < best.int8_ms / best.fp32_ms:
                    best, best_path = candidate, path
            if best.int8_ms > best.fp32_ms:
                return Int8Speed(best.kept_fp32, best.fp32_ms, best.int8_ms, written=False)
        with atomic_path(int8_path) as temp:
            shutil.copyfile(best_path, temp)
    return best


def _not_pre_processing_advice(record: logging.LogRecord) -> bool:
    # onnxruntime's quantiser advises quant_pre_process on every call; measured, it did not help here
    # (module docstring), and the speed check quantises a network several times.
    return "pre-processing before quantization" not in record.getMessage()


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
    """What :func:`quantize_pair` wrote and measured: the INT8 files, the fit's top-1 accuracy
    (fractions) in fp32 and INT8 when validation data were given and the INT8 fit was written (else
    None), and the speed of each INT8 network against its fp32 one (dense, fit)."""

    paths: list[Path]
    fit_fp32_accuracy: float | None
    fit_int8_accuracy: float | None
    speeds: tuple[Int8Speed, ...] = ()

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
                  max_accuracy_drop: float = MAX_ACCURACY_DROP, keep_fp32: Sequence[str] | None = None,
                  timer: Callable[[Path, Path, np.ndarray], tuple[float, float]] | None = None) -> Int8Export:
    """Quantise ``directory``'s dense.onnx and fit.onnx to dense.int8.onnx and fit.int8.onnx, each
    no slower than its fp32 network (:func:`quantize_no_slower`: an INT8 network that stays slower
    is not written, and a stale INT8 file of that name is removed).

    Both are written to temporary files first. With ``validation`` data, the fp32 and INT8 fit
    are evaluated on it in onnxruntime, and when INT8 loses more than ``max_accuracy_drop``
    points of top-1 accuracy nothing is written and the reason is raised; else, and without
    validation data, the files are moved into place.

    Args:
        directory: where :func:`kecompress.export.export_pair` wrote the fp32 files.
        calibration: the calibration images (e.g. :func:`calibration_subset` of the training set).
        validation: held-out ``(image, label)`` items for the accuracy check, or None to skip it.
        max_accuracy_drop: the most points of top-1 accuracy the INT8 fit may lose.
        keep_fp32, timer: as in :func:`quantize_no_slower`.

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
        >>> [path.name for path in quantize_pair(directory, images, keep_fp32=()).paths]  # every kind quantised
        ['dense.int8.onnx', 'fit.int8.onnx']
    """
    directory = Path(directory)
    _check_drop(max_accuracy_drop)
    missing = [name for name in PAIR_FILES if not (directory / name).is_file()]
    if missing:
        raise KecompressError(f"{directory} has no {' or '.join(missing)}: export the fp32 networks first "
                              "(kecompress.export.export_pair)")
    with staged_directory(directory) as staging:  # the files appear only once all exist and the fit passed the check
        speeds = tuple(quantize_no_slower(directory / fp32_name, staging / int8_name, calibration, keep_fp32, timer)
                       for fp32_name, int8_name in zip(PAIR_FILES, INT8_PAIR_FILES))
        paths = [directory / name for name, speed in zip(INT8_PAIR_FILES, speeds) if speed.written]
        if validation is None or not speeds[1].written:
            result = Int8Export(paths, None, None, speeds)
        else:
            result = Int8Export(paths, onnx_top1(directory / PAIR_FILES[1], validation),
                                onnx_top1(staging / INT8_PAIR_FILES[1], validation), speeds)
        if result.fit_fp32_accuracy is not None and result.accuracy_drop_points > max_accuracy_drop:
            raise KecompressError(
                f"the INT8 fit loses {result.accuracy_drop_points:.2f} points of top-1 accuracy on {len(validation)} "
                f"validation images (fp32 {result.fit_fp32_accuracy:.2%}, INT8 {result.fit_int8_accuracy:.2%}), "
                f"more than the {max_accuracy_drop:g} allowed: no INT8 file written; calibrate on more images "
                "or allow more (--max-accuracy-drop)")
    for name, speed in zip(INT8_PAIR_FILES, speeds):
        if not speed.written:  # an INT8 file of an earlier export would stand beside fp32 files it does not match
            (directory / name).unlink(missing_ok=True)
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
