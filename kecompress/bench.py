"""Cost of the dense network and its slim fit: MACs, parameters, and CPU latency.

The MAC ratio (dense / fit) is the ceiling a latency ratio is judged against: the fit can run
at most that much faster. Latency is measured like a benchmark, not a test: a fixed thread
count, warm-up runs, many timed runs, the median and the 90th percentile, dense and fit in the
same process and interleaved (dense, fit, dense, fit, ...) so that machine drift hits both.

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

import numpy as np
import onnxruntime as ort
import torch
import torch.nn as nn
import torch_pruning as tp
from rich.table import Table

from .errors import KecompressError
from .evaluation import eval_mode
from .export import INPUT_NAME, example_input, export_onnx, onnx_session

RUNTIMES = ("onnxruntime", "torch")
# onnxruntime's idle intra-op threads keep spinning for tens of milliseconds after a run; with
# two sessions interleaved, the idle one's spinning threads halve the other's speed on a small
# machine (measured: ResNet18, 2 threads, 17.9 -> 35.8 ms). Stopping the spin at the end of each
# run keeps the spin inside runs, where it speeds them up.
_TIMING_CONFIG = {"session.force_spinning_stop": "1"}
_PREFIX = {"onnxruntime": "ort", "torch": "torch"}  # of the runtimes' keys in JSON


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
class RuntimeLatency:
    """Latency of the dense and the fit network in one runtime, in milliseconds.

    Example:
        >>> RuntimeLatency.measured([8.0, 9.0], [2.0, 2.5], macs_ratio=4.0).efficiency
        0.9444444444444444
    """

    dense_median_ms: float
    dense_p90_ms: float
    fit_median_ms: float
    fit_p90_ms: float
    speedup: float  # dense median / fit median
    efficiency: float  # speedup / MAC ratio: 1 means the fit gains all that its MACs promise

    @classmethod
    def measured(cls, dense_ms: list[float], fit_ms: list[float], macs_ratio: float) -> "RuntimeLatency":
        """The medians, 90th percentiles, speedup and efficiency of timed runs."""
        speedup = float(np.median(dense_ms) / np.median(fit_ms))
        return cls(float(np.median(dense_ms)), float(np.percentile(dense_ms, 90)), float(np.median(fit_ms)),
                   float(np.percentile(fit_ms, 90)), speedup, speedup / macs_ratio)


@dataclass(frozen=True)
class BatchLatency:
    """The latencies at one batch size: per runtime, None when it was not timed.

    Example:
        >>> row = BatchLatency(1, 4.0, onnxruntime=None, torch=RuntimeLatency(8.0, 9.0, 2.0, 2.5, 4.0, 1.0))
        >>> row.to_json()["torch_speedup"], row.to_json()["ort_speedup"]
        (4.0, None)
    """

    batch_size: int
    macs_ratio: float
    onnxruntime: RuntimeLatency | None
    torch: RuntimeLatency | None

    def runtime(self, name: str) -> RuntimeLatency | None:
        """The latencies of runtime ``name`` (``"onnxruntime"`` or ``"torch"``)."""
        return getattr(self, name)

    def to_json(self) -> dict:
        """The row as earlier versions wrote it: each runtime's fields prefixed ``ort_`` or ``torch_``."""
        row = {"batch_size": self.batch_size, "macs_ratio": self.macs_ratio}
        for runtime in RUNTIMES:
            latency = self.runtime(runtime)
            row.update({f"{_PREFIX[runtime]}_{item.name}": getattr(latency, item.name) if latency else None
                        for item in fields(RuntimeLatency)})
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
                    runtimes=RUNTIMES, threads: int = 2, warmup: int = 10, runs: int = 50) -> LatencyResult:
    """Time the dense and the fit network on the CPU, interleaved, in each runtime.

    For onnxruntime both networks are exported (static shapes, opset 17) to a temporary
    directory and run with ``threads`` intra-op threads, one inter-op thread, all graph
    optimisations, and the intra-op threads told to stop spinning at the end of each run (so
    that the idle session's threads do not steal the cores of the running one). For PyTorch
    they run eagerly in eval mode under ``torch.inference_mode`` with
    ``torch.set_num_threads(threads)``; the previous thread count and the models' train/eval
    modes are restored afterwards.

    Args:
        dense: the dense network.
        fit: its slim fit network (:func:`kecompress.slice_fit`).
        input_shape: the shape of one sample, without the batch dimension.
        batch_sizes: the batch sizes to time, each separately.
        runtimes: any of ``"onnxruntime"`` and ``"torch"``.
        threads: CPU threads each runtime may use.
        warmup: untimed runs of each network before timing.
        runs: timed runs of each network.

    Returns:
        A :class:`LatencyResult`: the machine (processor, cpu count, versions, threads), the
        settings, the cost of each network, the MAC ratio, and per batch size the medians, 90th
        percentiles, speedup and efficiency of each runtime timed (None for the others).
        ``to_json()`` gives it as ``kecompress bench --json`` prints it.

    Raises:
        KecompressError: an unknown runtime, a non-positive count, or models not on the CPU.

    Example:
        >>> import torchvision, kecompress
        >>> dense = torchvision.models.resnet18(num_classes=10)
        >>> x = torch.randn(1, 3, 64, 64)
        >>> fit = kecompress.slice_fit(dense, kecompress.split(dense, "kels", 0.5, x), x)
        >>> result = measure_latency(dense, fit, (3, 64, 64), warmup=1, runs=3)
        >>> result.results[0].onnxruntime.speedup > 0, result.results[0].torch.speedup > 0
        (True, True)
    """
    runtimes = _check_settings(dense, fit, batch_sizes, runtimes, threads, warmup, runs)
    dense_cost = NetworkCost(*count_macs_params(dense, input_shape))
    fit_cost = NetworkCost(*count_macs_params(fit, input_shape))
    macs_ratio = dense_cost.macs / fit_cost.macs
    results = []
    for batch_size in batch_sizes:
        sample = example_input(dense, input_shape, batch_size)
        sample.copy_(torch.randn(sample.shape, generator=torch.Generator().manual_seed(0)))
        timers = {"onnxruntime": _time_onnxruntime, "torch": _time_torch}
        latencies = {runtime: RuntimeLatency.measured(*timers[runtime](dense, fit, sample, threads, warmup, runs),
                                                      macs_ratio=macs_ratio) if runtime in runtimes else None
                     for runtime in RUNTIMES}
        results.append(BatchLatency(int(batch_size), macs_ratio, **latencies))
    settings = {"input_shape": [int(size) for size in input_shape], "warmup": int(warmup), "runs": int(runs),
                "runtimes": list(runtimes)}
    return LatencyResult(machine_description(threads), settings, dense_cost, fit_cost, macs_ratio, results)


def machine_description(threads: int | None = None) -> dict:
    """What a latency figure was measured on: processor, cores, library versions.

    Example:
        >>> machine_description(2)["threads"]
        2
    """
    return {"processor": _processor_name(), "machine": platform.machine(), "system": platform.system(),
            "cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "onnxruntime": ort.__version__, "threads": threads}


def latency_table(result: LatencyResult, title: str = "Latency, dense vs fit") -> Table:
    """A ``rich`` table of :func:`measure_latency`'s result: one row per batch size.

    Example:
        >>> row = BatchLatency(1, 4.0, RuntimeLatency(8.0, 9.0, 2.0, 2.5, 4.0, 1.0), torch=None)
        >>> latency_table(LatencyResult({}, {}, NetworkCost(40, 10), NetworkCost(10, 3), 4.0, [row])).row_count
        1
    """
    table = Table(title=title, caption="latency: median / 90th percentile ms; efficiency: speedup / MAC ratio")
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
    return table


def latency_cells(latency: RuntimeLatency) -> list[str]:
    """The dense and fit latency (median / 90th percentile ms) and the speedup, as table cells.

    Example:
        >>> latency_cells(RuntimeLatency(8.0, 9.0, 2.0, 2.5, 4.0, 1.0))
        ['8.00 / 9.00', '2.00 / 2.50', '4.00x']
    """
    return [f"{latency.dense_median_ms:.2f} / {latency.dense_p90_ms:.2f}",
            f"{latency.fit_median_ms:.2f} / {latency.fit_p90_ms:.2f}", f"{latency.speedup:.2f}x"]


def _time_interleaved(run_dense, run_fit, warmup: int, runs: int) -> tuple[list[float], list[float]]:
    """Milliseconds of each timed run of the two callables, alternating between them."""
    for _ in range(warmup):
        run_dense()
        run_fit()
    dense_ms, fit_ms = [], []
    gc_was_enabled = gc.isenabled()
    gc.disable()  # a collection in the middle of one run would be timed as that run's
    try:
        for _ in range(runs):
            for run, times in ((run_dense, dense_ms), (run_fit, fit_ms)):
                start = time.perf_counter()
                run()
                times.append((time.perf_counter() - start) * 1e3)
    finally:
        if gc_was_enabled:
            gc.enable()
    return dense_ms, fit_ms


def _time_onnxruntime(dense, fit, sample, threads, warmup, runs):
    feed = {INPUT_NAME: sample.cpu().numpy()}
    sessions = []
    with tempfile.TemporaryDirectory() as directory:
        for name, model in (("dense", dense), ("fit", fit)):
            path = export_onnx(model, Path(directory) / f"{name}.onnx", tuple(sample.shape[1:]), sample.shape[0])
            sessions.append(onnx_session(path, threads=threads, config=_TIMING_CONFIG))
    dense_session, fit_session = sessions
    return _time_interleaved(lambda: dense_session.run(None, feed), lambda: fit_session.run(None, feed),
                             warmup, runs)


def _time_torch(dense, fit, sample, threads, warmup, runs):
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with eval_mode(dense), eval_mode(fit), torch.inference_mode():
            return _time_interleaved(lambda: dense(sample), lambda: fit(sample), warmup, runs)
    finally:
        torch.set_num_threads(previous_threads)


def _check_settings(dense, fit, batch_sizes, runtimes, threads, warmup, runs) -> tuple[str, ...]:
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
