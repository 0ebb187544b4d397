"""Cost of the dense network and its slim fit: MACs, parameters, and CPU latency.

The MAC ratio (dense / fit) is the ceiling a latency ratio is judged against: the fit can run
at most that much faster. Latency is measured like a benchmark, not a test: a fixed thread
count, warm-up runs, many timed runs, the median and the 90th percentile, dense and fit in the
same process and interleaved (dense, fit, dense, fit, ...) so that machine drift hits both.
At 1 thread the clock can be the running thread's CPU time instead of the wall clock: on a
machine shared with other jobs, the time they take the core away is then left out.

With INT8 (:mod:`kecompress.quantize`), onnxruntime also times the static INT8 dense and fit
networks, interleaved with the fp32 ones: the networks ``kecompress export --int8`` writes, chosen
by the same rule (:func:`~kecompress.quantize.quantize_no_slower`: losing kinds of convolutions kept
in fp32 until INT8 is no slower, or no INT8 network at all, and then none is timed). INT8 speed
depends on the CPU's integer instructions (AVX2, AVX-512, VNNI), so the machine's description lists
them (:func:`cpu_instruction_sets`).

Only a KELS fit is worth timing: a WELS fit is the dense network with zeros in it, and dense
runtimes (onnxruntime, PyTorch) multiply zeros as fast as any other number, at dense speed.
"""

from __future__ import annotations

import gc
import os
import platform
import tempfile
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import onnxruntime as ort
import torch
import torch.nn as nn
import torch_pruning as tp
from rich.table import Table
from torch.utils.data import Dataset

from .errors import KecompressError
from .evaluation import eval_mode
from .export import DEFAULT_EXPORTER, INPUT_NAME, check_exporter, example_input, export_onnx, onnx_session
from .quantize import CALIBRATION_IMAGES, Int8Speed, calibration_subset, check_keep_fp32, quantize_no_slower

RUNTIMES = ("onnxruntime", "torch")
# onnxruntime's idle intra-op threads keep spinning for tens of milliseconds after a run; with
# two sessions interleaved, the idle one's spinning threads halve the other's speed on a small
# machine (measured: ResNet18, 2 threads, 17.9 -> 35.8 ms). Stopping the spin at the end of each
# run keeps the spin inside runs, where it speeds them up.
_TIMING_CONFIG = {"session.force_spinning_stop": "1"}
_PREFIX = {"onnxruntime": "ort", "torch": "torch"}  # of the runtimes' keys in JSON
# "thread": the CPU time of the calling thread, which runs all the work at 1 thread in both runtimes.
CLOCKS = {"wall": time.perf_counter, "thread": time.thread_time}
# The /proc/cpuinfo flags that decide how fast onnxruntime's INT8 kernels run, and their names.
_INT8_FLAGS = {"avx2": "AVX2", "avx512f": "AVX-512", "avx512_vnni": "AVX512-VNNI", "avx_vnni": "AVX-VNNI",
               "amx_int8": "AMX-INT8"}


def count_macs_params(model: nn.Module, input_shape=(3, 224, 224)) -> tuple[int, int]:
    """Multiply-accumulates of one forward pass of one sample, and the parameter count.

    Counted by torch-pruning's ``tp.utils.count_ops_and_params``: convolutions and linear
    layers (a bias counts one per output), normalisation, pooling and ReLU-style activations;
    functional operations (residual additions, SiLU/Hardswish modules it does not know) are not.

    Args:
        model: any network; it is not modified.
        input_shape: the shape of one sample, without the batch dimension.

    Returns:
        ``(macs, params)`` as integers.

    Example:
        >>> count_macs_params(nn.Linear(4, 2), (4,))
        (10, 10)
    """
    with torch.no_grad():
        macs, params = tp.utils.count_ops_and_params(model, example_input(model, input_shape))
    return int(macs), int(params)


@dataclass(frozen=True)
class _DenseFitLatency:
    """The median and 90th percentile latency of a dense and a fit network, in milliseconds."""

    dense_median_ms: float
    dense_p90_ms: float
    fit_median_ms: float
    fit_p90_ms: float


def _medians_and_p90s(dense_ms: list[float], fit_ms: list[float]) -> tuple[float, float, float, float]:
    return (float(np.median(dense_ms)), float(np.percentile(dense_ms, 90)), float(np.median(fit_ms)),
            float(np.percentile(fit_ms, 90)))


@dataclass(frozen=True)
class RuntimeLatency(_DenseFitLatency):
    """Latency of the dense and the fit network in one runtime, in milliseconds.

    Example:
        >>> RuntimeLatency.measured([8.0, 9.0], [2.0, 2.5], macs_ratio=4.0).efficiency
        0.9444444444444444
    """

    speedup: float  # dense median / fit median
    efficiency: float  # speedup / MAC ratio: 1 means the fit gains all that its MACs promise

    @classmethod
    def measured(cls, dense_ms: list[float], fit_ms: list[float], macs_ratio: float) -> "RuntimeLatency":
        """The medians, 90th percentiles, speedup and efficiency of timed runs."""
        times = _medians_and_p90s(dense_ms, fit_ms)
        speedup = times[0] / times[2]
        return cls(*times, speedup, speedup / macs_ratio)


@dataclass(frozen=True)
class Int8Latency(_DenseFitLatency):
    """Latency of the static INT8 dense and fit networks in onnxruntime, in milliseconds: the
    networks ``export --int8`` writes (``dense_choice`` and ``fit_choice``, each an
    :class:`~kecompress.quantize.Int8Speed`, say which kinds stay in fp32). Where no INT8 network
    beats fp32, export writes none and none is timed: its times and speedup are None.

    Example:
        >>> chosen = Int8Speed((), 8.0, 4.0, written=True)
        >>> Int8Latency.measured([4.0, 5.0], [1.0, 1.5], 8.0, chosen, chosen).speedup
        6.4
        >>> Int8Latency.measured(None, [1.0], 8.0, Int8Speed((), 8.0, 9.0, written=False), chosen).dense_speedup is None
        True
    """

    speedup: float | None  # fp32 dense median / INT8 fit median: what deploying the INT8 fit gains
    dense_speedup: float | None  # fp32 dense median / INT8 dense median: what INT8 alone gains
    dense_choice: Int8Speed
    fit_choice: Int8Speed

    @classmethod
    def measured(cls, dense_ms: list[float] | None, fit_ms: list[float] | None, fp32_dense_median_ms: float,
                 dense_choice: Int8Speed, fit_choice: Int8Speed) -> "Int8Latency":
        """The medians, 90th percentiles and speedups of timed runs (None for a network not timed)."""
        dense = _median_and_p90(dense_ms)
        fit = _median_and_p90(fit_ms)
        return cls(*dense, *fit, fp32_dense_median_ms / fit[0] if fit_ms else None,
                   fp32_dense_median_ms / dense[0] if dense_ms else None, dense_choice, fit_choice)

    def to_json(self) -> dict:
        """``int8_ort_speedup`` beside the fp32 ``ort_speedup``, the rest prefixed ``ort_int8_``; per
        network the kinds kept in fp32, whether an INT8 network beat fp32 (``..._written``) and the best
        INT8 network's speed over fp32 in export's check (``..._check_speedup``)."""
        row = {"int8_ort_speedup": self.speedup, "int8_ort_dense_speedup": self.dense_speedup,
               **{f"ort_int8_{item.name}": getattr(self, item.name) for item in fields(self)
                  if item.name.endswith("_ms")}}
        for name, choice in (("dense", self.dense_choice), ("fit", self.fit_choice)):
            row[f"ort_int8_{name}_kept_fp32"] = list(choice.kept_fp32)
            row[f"ort_int8_{name}_written"] = choice.written
            row[f"ort_int8_{name}_check_speedup"] = choice.speedup
        return row

    def describe(self, batch_size: int, fp32: RuntimeLatency) -> list[str]:
        """A line per network: what INT8 kept in fp32 and how fast it ran against ``fp32`` (the fp32
        networks' latency, timed with it), or that no INT8 network beats fp32.

        Example:
            >>> kept = Int8Speed(("depthwise",), 2.0, 1.6, written=True)
            >>> slower = Int8Speed(("depthwise", "small-1x1"), 2.0, 2.5, written=False)
            >>> fp32 = RuntimeLatency(2.0, 2.2, 1.0, 1.1, 2.0, 0.5)
            >>> for line in Int8Latency.measured([1.6], None, 2.0, kept, slower).describe(1, fp32):
            ...     print(line)
            batch 1 INT8 dense: 1.60 ms against fp32 2.00 ms, 1.25x its speed (export's check: 1.25x), depthwise convolutions kept in fp32
            batch 1 INT8 fit: none, no INT8 network beats fp32 on this CPU (at best 0.80x its speed, with depthwise, small-1x1 convolutions kept in fp32): export --int8 writes none, so none is timed
        """
        lines = []
        for name, choice, int8_ms, fp32_ms in (("dense", self.dense_choice, self.dense_median_ms, fp32.dense_median_ms),
                                               ("fit", self.fit_choice, self.fit_median_ms, fp32.fit_median_ms)):
            kept = (f"{', '.join(choice.kept_fp32)} convolutions kept in fp32" if choice.kept_fp32
                    else "every kind quantised")
            if choice.written:
                lines.append(f"batch {batch_size} INT8 {name}: {int8_ms:.2f} ms against fp32 {fp32_ms:.2f} ms, "
                             f"{fp32_ms / int8_ms:.2f}x its speed (export's check: {choice.speedup:.2f}x), {kept}")
            else:
                lines.append(f"batch {batch_size} INT8 {name}: none, no INT8 network beats fp32 on this CPU (at best "
                             f"{choice.speedup:.2f}x its speed, with {kept}): export --int8 writes none, so none "
                             "is timed")
        return lines


def _median_and_p90(milliseconds: list[float] | None) -> tuple[float | None, float | None]:
    if not milliseconds:
        return None, None
    return float(np.median(milliseconds)), float(np.percentile(milliseconds, 90))


@dataclass(frozen=True)
class BatchLatency:
    """The latencies at one batch size: per runtime, None when it was not timed; ``int8`` when
    the INT8 networks were timed too.

    Example:
        >>> row = BatchLatency(1, 4.0, onnxruntime=None, torch=RuntimeLatency(8.0, 9.0, 2.0, 2.5, 4.0, 1.0))
        >>> row.to_json()["torch_speedup"], row.to_json()["ort_speedup"]
        (4.0, None)
    """

    batch_size: int
    macs_ratio: float
    onnxruntime: RuntimeLatency | None
    torch: RuntimeLatency | None
    int8: Int8Latency | None = None

    def runtime(self, name: str) -> RuntimeLatency | None:
        """The latencies of runtime ``name`` (``"onnxruntime"`` or ``"torch"``)."""
        return getattr(self, name)

    def to_json(self) -> dict:
        """The row as earlier versions wrote it: each runtime's fields prefixed ``ort_`` or ``torch_``;
        then, when timed, the INT8 fields (:meth:`Int8Latency.to_json`)."""
        row = {"batch_size": self.batch_size, "macs_ratio": self.macs_ratio}
        for runtime in RUNTIMES:
            latency = self.runtime(runtime)
            row.update({f"{_PREFIX[runtime]}_{item.name}": getattr(latency, item.name) if latency else None
                        for item in fields(RuntimeLatency)})
        if self.int8:
            row.update(self.int8.to_json())
        return row


@dataclass(frozen=True)
class NetworkCost:
    """Multiply-accumulates of one sample's forward pass, and parameters."""

    macs: int
    params: int


@dataclass(frozen=True)
class LatencyResult:
    """What :func:`measure_latency` measured: the machine, the settings, each network's cost, the
    MAC ratio (dense / fit) and one :class:`BatchLatency` per batch size.

    Example:
        >>> row = BatchLatency(1, 4.0, RuntimeLatency(8.0, 9.0, 2.0, 2.5, 4.0, 1.0), None)
        >>> result = LatencyResult({}, {}, NetworkCost(40, 10), NetworkCost(10, 3), 4.0, [row])
        >>> list(result.to_json()), result.results[0].onnxruntime.speedup
        (['machine', 'settings', 'dense', 'fit', 'macs_ratio', 'results'], 4.0)
    """

    machine: dict
    settings: dict
    dense: NetworkCost
    fit: NetworkCost
    macs_ratio: float
    results: list[BatchLatency]

    def to_json(self) -> dict:
        """The JSON of ``kecompress bench --json``, with the keys earlier versions wrote."""
        return {"machine": self.machine, "settings": self.settings, "dense": asdict(self.dense),
                "fit": asdict(self.fit), "macs_ratio": self.macs_ratio,
                "results": [row.to_json() for row in self.results]}


def measure_latency(dense: nn.Module, fit: nn.Module, input_shape=(3, 224, 224), batch_sizes=(1,),
                    runtimes=RUNTIMES, threads: int = 2, warmup: int = 10, runs: int = 50,
                    exporter: str = DEFAULT_EXPORTER, int8_calibration: Dataset | None = None,
                    calibration_images: int = CALIBRATION_IMAGES, clock: str = "wall",
                    int8_keep_fp32: Sequence[str] | None = None,
                    int8_timer: Callable[[Path, Path, np.ndarray], tuple[float, float]] | None = None) -> LatencyResult:
    """Time the dense and the fit network on the CPU, interleaved, in each runtime.

    For onnxruntime both networks are exported (static shapes, the exporter's default opset) to a temporary
    directory and run with ``threads`` intra-op threads, one inter-op thread, all graph
    optimisations, and the intra-op threads told to stop spinning at the end of each run (so
    that the idle session's threads do not steal the cores of the running one). For PyTorch
    they run eagerly in eval mode under ``torch.inference_mode`` with
    ``torch.set_num_threads(threads)``; the previous thread count and the models' train/eval
    modes are restored afterwards. With ``int8_calibration``, onnxruntime also times the static
    INT8 dense and fit networks that ``kecompress export --int8`` writes, all four interleaved:
    :func:`kecompress.quantize.quantize_no_slower`, calibrated on a seeded sample of
    ``calibration_images`` of it, keeps losing kinds of convolutions in fp32 while INT8 runs slower
    (its own 1-thread check, at each batch size), and a network of which no INT8 version beats
    fp32 has no INT8 time. With ``clock="thread"`` (1
    thread only) a run's time is the CPU time of the thread that ran it: what a core of its own
    would take, on a machine where other processes also want the cores.

    Args:
        dense: the dense network.
        fit: its slim fit network (:func:`kecompress.slice_fit`).
        input_shape: the shape of one sample, without the batch dimension.
        batch_sizes: the batch sizes to time, each separately.
        runtimes: any of ``"onnxruntime"`` and ``"torch"``.
        threads: CPU threads each runtime may use.
        warmup: untimed runs of each network before timing.
        runs: timed runs of each network.
        exporter: the ONNX exporter, ``"dynamo"`` or ``"torchscript"``.
        int8_calibration: training images to calibrate INT8 networks on, or None for no INT8.
        calibration_images: the most of them to calibrate on.
        clock: ``"wall"`` (elapsed time) or ``"thread"`` (the running thread's CPU time, 1 thread only).
        int8_keep_fp32: the kinds of convolutions INT8 keeps in fp32 (as ``--int8-keep-fp32``), or None
            to choose them by timing.
        int8_timer: the INT8 speed check's timer (:func:`kecompress.quantize.quantize_no_slower`).

    Returns:
        A :class:`LatencyResult`: the machine (processor, cpu count, versions, threads), the
        settings, the cost of each network, the MAC ratio, and per batch size the medians, 90th
        percentiles, speedup and efficiency of each runtime timed (None for the others), and the
        INT8 latencies when asked for.
        ``to_json()`` gives it as ``kecompress bench --json`` prints it.

    Raises:
        KecompressError: an unknown runtime, exporter or clock, a non-positive count, the thread
            clock with more than 1 thread, models not on the CPU, or INT8 without onnxruntime.

    Example:
        >>> import torchvision, kecompress
        >>> dense = torchvision.models.resnet18(num_classes=10)
        >>> x = torch.randn(1, 3, 64, 64)
        >>> fit = kecompress.slice_fit(dense, kecompress.split(dense, "kels", 0.5, x), x)
        >>> result = measure_latency(dense, fit, (3, 64, 64), warmup=1, runs=3)
        >>> result.results[0].onnxruntime.speedup > 0, result.results[0].torch.speedup > 0
        (True, True)
    """
    runtimes = _check_settings(dense, fit, batch_sizes, runtimes, threads, warmup, runs, clock)
    exporter = check_exporter(exporter)
    if int8_calibration is not None:
        if "onnxruntime" not in runtimes:
            raise KecompressError("INT8 networks are timed in onnxruntime: add it to the runtimes "
                                  "(--runtime onnxruntime)")
        int8_calibration = calibration_subset(int8_calibration, calibration_images)
        int8_keep_fp32 = None if int8_keep_fp32 is None else check_keep_fp32(int8_keep_fp32)
    elif int8_keep_fp32 is not None:
        raise KecompressError("int8_keep_fp32 chooses what INT8 leaves in fp32: pass int8_calibration too, or drop it")
    dense_cost = NetworkCost(*count_macs_params(dense, input_shape))
    fit_cost = NetworkCost(*count_macs_params(fit, input_shape))
    macs_ratio = dense_cost.macs / fit_cost.macs
    results = []
    for batch_size in batch_sizes:
        sample = example_input(dense, input_shape, batch_size)
        sample.copy_(torch.randn(sample.shape, generator=torch.Generator().manual_seed(0)))
        onnxruntime = in_torch = int8 = None
        if "onnxruntime" in runtimes:
            times, choices = _time_onnxruntime(dense, fit, sample, threads, warmup, runs, exporter, int8_calibration,
                                               clock, int8_keep_fp32, int8_timer)
            onnxruntime = RuntimeLatency.measured(times["dense"], times["fit"], macs_ratio)
            if int8_calibration is not None:
                int8 = Int8Latency.measured(times.get("dense.int8"), times.get("fit.int8"),
                                            onnxruntime.dense_median_ms, *choices)
        if "torch" in runtimes:
            in_torch = RuntimeLatency.measured(*_time_torch(dense, fit, sample, threads, warmup, runs, clock),
                                               macs_ratio)
        results.append(BatchLatency(int(batch_size), macs_ratio, onnxruntime, in_torch, int8))
    settings = {"input_shape": [int(size) for size in input_shape], "warmup": int(warmup), "runs": int(runs),
                "runtimes": list(runtimes), "exporter": exporter, "clock": clock,
                "int8_calibration_images": len(int8_calibration) if int8_calibration is not None else None,
                "int8_keep_fp32": list(int8_keep_fp32) if int8_keep_fp32 is not None else None}
    return LatencyResult(machine_description(threads), settings, dense_cost, fit_cost, macs_ratio, results)


def machine_description(threads: int | None = None) -> dict:
    """What a latency figure was measured on: processor, cores, integer instruction sets, library versions.

    Example:
        >>> machine_description(2)["threads"]
        2
    """
    return {"processor": _processor_name(), "machine": platform.machine(), "system": platform.system(),
            "cpu_count": os.cpu_count(), "cpu_flags": cpu_instruction_sets(), "python": platform.python_version(),
            "torch": torch.__version__, "onnxruntime": ort.__version__, "threads": threads}


def cpu_instruction_sets() -> list[str]:
    """The instruction sets of this CPU that onnxruntime's INT8 kernels use (from /proc/cpuinfo;
    empty where it cannot be read): AVX2, AVX-512, and VNNI (AVX512-VNNI or AVX-VNNI), which does
    an 8-bit multiply-accumulate in one instruction.

    Example:
        >>> set(cpu_instruction_sets()) <= {"AVX2", "AVX-512", "AVX512-VNNI", "AVX-VNNI", "AMX-INT8"}
        True
    """
    try:
        flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("flags")), [])
    except OSError:
        flags = []
    return [name for flag, name in _INT8_FLAGS.items() if flag in flags]


def describe_cpu_flags(flags: list[str]) -> str:
    """A line saying which INT8-relevant instruction sets the CPU has, and which it lacks.

    Example:
        >>> describe_cpu_flags(["AVX2"])
        'CPU: AVX2; no AVX-512, no VNNI'
    """
    missing = [name for name, present in (("AVX-512", "AVX-512" in flags),
                                          ("VNNI", any(flag.endswith("VNNI") for flag in flags))) if not present]
    return "CPU: " + ", ".join(flags or ["no AVX2"]) + ("; no " + ", no ".join(missing) if missing else "")


def latency_table(result: LatencyResult, title: str = "Latency, dense vs fit") -> Table:
    """A ``rich`` table of :func:`measure_latency`'s result: one row per batch size, and below each
    an INT8 row when the INT8 networks were timed (its speedup: fp32 dense over INT8 fit).

    Example:
        >>> row = BatchLatency(1, 4.0, RuntimeLatency(8.0, 9.0, 2.0, 2.5, 4.0, 1.0), torch=None)
        >>> latency_table(LatencyResult({}, {}, NetworkCost(40, 10), NetworkCost(10, 3), 4.0, [row])).row_count
        1
    """
    int8 = any(row.int8 for row in result.results)
    caption = "latency: median / 90th percentile ms; efficiency: speedup / MAC ratio"
    if int8:
        caption += "; INT8 rows: the networks export --int8 writes, speedup fp32 dense / INT8 fit; " + describe_cpu_flags(result.machine.get("cpu_flags", []))
    table = Table(title=title, caption=caption)
    table.add_column("batch", justify="right")
    table.add_column("MAC ratio", justify="right")
    for name in ("ORT", "torch"):
        for column in ("dense ms", "fit ms", "speedup", "efficiency"):
            table.add_column(f"{name} {column}", justify="right")
    for row in result.results:
        cells = [str(row.batch_size), f"{row.macs_ratio:.2f}x"]
        for runtime in RUNTIMES:
            latency = row.runtime(runtime)
            cells += latency_cells(latency) + [f"{latency.efficiency:.2f}"] if latency else ["-"] * 4
        table.add_row(*cells)
        if row.int8:
            table.add_row(f"{row.batch_size} INT8", "", _int8_cell(row.int8.dense_median_ms, row.int8.dense_p90_ms),
                          _int8_cell(row.int8.fit_median_ms, row.int8.fit_p90_ms),
                          f"{row.int8.speedup:.2f}x" if row.int8.speedup else "-", *["-"] * 5)
    return table


def _int8_cell(median_ms: float | None, p90_ms: float | None) -> str:
    return f"{median_ms:.2f} / {p90_ms:.2f}" if median_ms is not None else "none"  # no INT8 network beats fp32


def latency_cells(latency: RuntimeLatency) -> list[str]:
    """The dense and fit latency (median / 90th percentile ms) and the speedup, as table cells.

    Example:
        >>> latency_cells(RuntimeLatency(8.0, 9.0, 2.0, 2.5, 4.0, 1.0))
        ['8.00 / 9.00', '2.00 / 2.50', '4.00x']
    """
    return [f"{latency.dense_median_ms:.2f} / {latency.dense_p90_ms:.2f}",
            f"{latency.fit_median_ms:.2f} / {latency.fit_p90_ms:.2f}", f"{latency.speedup:.2f}x"]


def time_interleaved(callables, warmup: int, runs: int, clock: str = "wall") -> list[list[float]]:
    """Milliseconds of each timed run of each callable, taking turns (dense, fit, dense, fit, ...),
    on one of :data:`CLOCKS`.

    Example:
        >>> [len(ms) for ms in time_interleaved([lambda: None, lambda: None], warmup=1, runs=3)]
        [3, 3]
    """
    for _ in range(warmup):
        for run in callables:
            run()
    now = CLOCKS[clock]
    times = [[] for _ in callables]
    gc_was_enabled = gc.isenabled()
    gc.disable()  # a collection in the middle of one run would be timed as that run's
    try:
        for _ in range(runs):
            for run, milliseconds in zip(callables, times):
                start = now()
                run()
                milliseconds.append((now() - start) * 1e3)
    finally:
        if gc_was_enabled:
            gc.enable()
    return times


def _time_onnxruntime(dense, fit, sample, threads, warmup, runs, exporter, int8_calibration, clock, keep_fp32, timer):
    """The times of each network by name (dense, fit, and the INT8 networks export --int8 would write:
    dense.int8, fit.int8), and the INT8 choice of dense and fit when there are calibration images."""
    feed = {INPUT_NAME: sample.cpu().numpy()}
    paths, choices = {}, []
    with tempfile.TemporaryDirectory() as directory:
        for name, model in (("dense", dense), ("fit", fit)):
            paths[name] = export_onnx(model, Path(directory) / f"{name}.onnx", tuple(sample.shape[1:]),
                                      sample.shape[0], exporter=exporter)
        if int8_calibration is not None:
            for name in ("dense", "fit"):
                int8_path = Path(directory) / f"{name}.int8.onnx"
                choices.append(quantize_no_slower(paths[name], int8_path, int8_calibration, keep_fp32, timer))
                if choices[-1].written:
                    paths[f"{name}.int8"] = int8_path
        sessions = {name: onnx_session(path, threads=threads, config=_TIMING_CONFIG) for name, path in paths.items()}
    times = time_interleaved([lambda session=session: session.run(None, feed) for session in sessions.values()],
                             warmup, runs, clock)
    return dict(zip(sessions, times)), choices


def _time_torch(dense, fit, sample, threads, warmup, runs, clock):
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with eval_mode(dense), eval_mode(fit), torch.inference_mode():
            return time_interleaved([lambda: dense(sample), lambda: fit(sample)], warmup, runs, clock)
    finally:
        torch.set_num_threads(previous_threads)


def _check_settings(dense, fit, batch_sizes, runtimes, threads, warmup, runs, clock) -> tuple[str, ...]:
    runtimes = (runtimes,) if isinstance(runtimes, str) else tuple(runtimes)
    unknown = [runtime for runtime in runtimes if runtime not in RUNTIMES]
    if unknown or not runtimes:
        raise KecompressError(f"unknown runtime(s) {unknown or runtimes!r}: choose from {', '.join(RUNTIMES)}")
    settings = [("threads", threads, 1), ("runs", runs, 1), ("warmup", warmup, 0)]
    settings += [("batch size", size, 1) for size in batch_sizes] or [("batch_sizes", batch_sizes, 1)]
    for name, value, least in settings:
        if not isinstance(value, int) or value < least:
            raise KecompressError(f"bad benchmark setting {name}={value!r}: threads, runs and batch sizes "
                                  "must be positive integers, warmup zero or more")
    if clock not in CLOCKS:
        raise KecompressError(f"unknown clock {clock!r}: choose from {', '.join(CLOCKS)}")
    if clock == "thread" and threads != 1:
        raise KecompressError(f"the thread clock times the one thread that runs the network: use threads=1, not "
                              f"{threads}, or the wall clock")
    for model in (dense, fit):
        if any(parameter.device.type != "cpu" for parameter in model.parameters()):
            raise KecompressError("measure_latency times CPU inference: move both models to the CPU (model.cpu())")
    return runtimes


def _processor_name() -> str:
    # platform.processor() is empty on most Linux systems; /proc/cpuinfo names the model.
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
