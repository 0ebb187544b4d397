"""ONNX export of a network (dense or slim fit), checked against PyTorch in onnxruntime.

Two exporters: torch's dynamo-based one (``torch.onnx.export(..., dynamo=True)``, the one torch
recommends and the default here) and the TorchScript-based one (``dynamo=False``, deprecated in
torch), kept behind ``exporter="torchscript"``. Measured on resnet18, mobilenet_v2 and
efficientnet_b0, dense and KELS fit (224 px, onnxruntime 1 thread, batch 1, 50 interleaved runs;
the table is in docs/cli.md): both export all of them and match PyTorch to 2e-6 of the output's
scale, and the dynamo graphs run as fast or a little faster (resnet18 fit 11.25 against 12.44 ms,
efficientnet_b0 dense 17.97 against 19.59 ms, the rest within 3%); they hold fewer nodes but take
1.4-8x longer to export. The dynamo exporter implements opset 18 and newer only (asked for 17 it
silently writes 18), so its default opset is 18.

The dynamo exporter writes global average pooling as ``ReduceMean`` over height and width, which
onnxruntime's INT8 (QDQ) kernels do not cover: the INT8 efficientnet_b0 ran 16-19% slower from
dynamo graphs than from TorchScript ones (fit 6.39 against 5.52 ms, dense 11.54 against 9.66 ms).
So those nodes are rewritten as the equivalent ``GlobalAveragePool``, after which the INT8 fit runs
as fast as TorchScript's (5.91 against 5.86 ms; fp32 6.33 against 6.32 ms).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
import onnxruntime as ort
import torch
import torch.nn as nn
import torch_pruning as tp
from rich.table import Table

from .errors import KecompressError
from .evaluation import eval_mode
from .files import atomic_path

EXPORTERS = ("dynamo", "torchscript")
DEFAULT_EXPORTER = "dynamo"
LOWEST_OPSET = {"dynamo": 18, "torchscript": 17}  # each exporter's lowest, also its default
MIN_OPSET = min(LOWEST_OPSET.values())
MAX_OPSET = 20  # the newest the TorchScript exporter implements
PAIR_FILES = ("dense.onnx", "fit.onnx")  # what export_pair writes
INPUT_NAME, OUTPUT_NAME = "input", "output"


def export_onnx(model: nn.Module, path: str | Path, input_shape=(3, 224, 224), batch_size: int = 1,
                opset: int | None = None, dynamic_batch: bool = False, exporter: str = DEFAULT_EXPORTER) -> Path:
    """Export ``model`` in eval mode to an ONNX file, atomically, and check the file.

    The file is written to a temporary name in the same directory and moved into place only
    once ``onnx.checker`` accepts it, so a failure never leaves a partial file and never
    touches a file already at ``path``. The model's train/eval mode is left as it was.

    Args:
        model: the network (dense or slim fit); models over 2 GB are not supported.
        path: where to write the ``.onnx`` file; missing parent directories are created.
        input_shape: the shape of one input sample, without the batch dimension.
        batch_size: the batch size the graph is traced with (and fixed to, unless ``dynamic_batch``).
        opset: ONNX operator set, up to 20, from 18 for the dynamo exporter and 17 for TorchScript;
            None: the exporter's lowest.
        dynamic_batch: leave the batch dimension of input and output free.
        exporter: ``"dynamo"`` or ``"torchscript"`` (see the module's docstring).

    Returns:
        The path of the written file. Its input is named ``"input"``, its output ``"output"``.

    Raises:
        KecompressError: an unknown exporter, an opset outside its range, a bad shape, or a model the
            exporter cannot handle.

    Example:
        >>> import tempfile, os, torchvision
        >>> path = export_onnx(torchvision.models.resnet18(num_classes=10),
        ...                    os.path.join(tempfile.mkdtemp(), "resnet18.onnx"), input_shape=(3, 64, 64))
        >>> path.name
        'resnet18.onnx'
    """
    exporter = check_exporter(exporter)
    opset = _check_opset(opset, exporter)
    example = example_input(model, input_shape, batch_size)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_path(path) as temp:  # the file appears only once the checker accepts it
            _export(model, example, temp, opset, dynamic_batch, exporter)
            onnx.checker.check_model(str(temp))
    except KecompressError:
        raise
    except Exception as error:
        first_line = str(error).splitlines()[0] if str(error) else ""
        raise KecompressError(f"ONNX export to {path} failed ({error.__class__.__name__}: {first_line}); "
                              "the model must be traceable with one tensor input") from error
    return path


def _export(model: nn.Module, example: torch.Tensor, path: Path, opset: int, dynamic_batch: bool,
            exporter: str) -> None:
    names = {"input_names": [INPUT_NAME], "output_names": [OUTPUT_NAME], "opset_version": opset}
    with eval_mode(model), warnings.catch_warnings():
        if exporter == "dynamo":
            # external_data=False: one self-contained file, which the atomic rename can move.
            shapes = ({0: torch.export.Dim.DYNAMIC},) if dynamic_batch else None
            torch.onnx.export(model, (example,), str(path), dynamo=True, external_data=False, dynamic_shapes=shapes,
                              verbose=False, **names)
            graph = onnx.load(str(path))
            if _global_average_pools(graph.graph):
                onnx.save(graph, str(path))
        else:
            # Chosen by the user; its deprecation notice would only repeat what the option's help says.
            warnings.simplefilter("ignore", DeprecationWarning)
            axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic_batch else None
            torch.onnx.export(model, (example,), str(path), dynamo=False, dynamic_axes=axes, **names)


def _global_average_pools(graph: onnx.GraphProto) -> int:
    """Rewrite ``ReduceMean`` over the last two axes of a 4-d tensor, keeping them, as the equivalent
    ``GlobalAveragePool`` (see the module's docstring); returns how many were rewritten."""
    constants = {tensor.name: tensor for tensor in graph.initializer}
    rewritten = 0
    for node in graph.node:
        axes = constants.get(node.input[1]) if node.op_type == "ReduceMean" and len(node.input) == 2 else None
        keeps_dims = all(attribute.i == 1 for attribute in node.attribute if attribute.name == "keepdims")
        if axes is None or not keeps_dims or sorted(numpy_helper.to_array(axes).tolist()) not in ([2, 3], [-2, -1]):
            continue
        if _rank(graph, node.input[0]) != 4:  # (noop_with_empty_axes matters only without axes)
            continue
        node.op_type = "GlobalAveragePool"
        del node.input[1:]
        del node.attribute[:]
        rewritten += 1
    used = {name for node in graph.node for name in node.input}
    unused = [tensor for tensor in graph.initializer if tensor.name not in used]
    for tensor in unused:  # the axes tensors: onnxruntime warns about every unused one
        graph.initializer.remove(tensor)
    return rewritten


def _rank(graph: onnx.GraphProto, name: str) -> int | None:
    for value in [*graph.input, *graph.value_info, *graph.output]:
        if value.name == name and value.type.tensor_type.HasField("shape"):
            return len(value.type.tensor_type.shape.dim)
    return None


def check_exporter(exporter) -> str:
    """``exporter`` if it is one of :data:`EXPORTERS`.

    Example:
        >>> check_exporter("torchscript")
        'torchscript'
    """
    if exporter not in EXPORTERS:
        raise KecompressError(f"unknown ONNX exporter {exporter!r}: choose {' or '.join(EXPORTERS)}")
    return exporter


def check_onnx_parity(model: nn.Module, path: str | Path, input: torch.Tensor) -> float:
    """Run ``path`` in onnxruntime and ``model`` (in eval mode) in PyTorch on ``input``.

    Args:
        model: the network the file was exported from. Its train/eval mode is left as it was.
        path: an ONNX file written by :func:`export_onnx`.
        input: one input batch.

    Returns:
        The largest absolute difference between the two outputs.

    Raises:
        KecompressError: the file cannot be loaded or its outputs do not have the model's shapes.

    Example:
        >>> import tempfile, os, torchvision
        >>> model = torchvision.models.resnet18(num_classes=10)
        >>> path = export_onnx(model, os.path.join(tempfile.mkdtemp(), "m.onnx"), input_shape=(3, 64, 64))
        >>> check_onnx_parity(model, path, torch.randn(1, 3, 64, 64)) < 1e-4
        True
    """
    return _parity(model, path, input)[0]


def _parity(model: nn.Module, path: str | Path, input: torch.Tensor) -> tuple[float, float]:
    """(max |onnx - torch|, max |torch|) over all outputs."""
    with torch.no_grad(), eval_mode(model):
        expected = _as_arrays(model(input))
    got = onnx_session(path).run(None, {INPUT_NAME: input.detach().cpu().numpy()})
    if [a.shape for a in got] != [e.shape for e in expected]:
        raise KecompressError(f"{path} gives outputs of shapes {[a.shape for a in got]}, the model "
                              f"{[e.shape for e in expected]}: export the model again")
    difference = max(float(np.abs(a - e).max(initial=0.0)) for a, e in zip(got, expected))
    scale = max(float(np.abs(e).max(initial=0.0)) for e in expected)
    return difference, scale


def onnx_session(path: str | Path, threads: int | None = None,
                 config: dict[str, str] | None = None) -> ort.InferenceSession:
    """An onnxruntime CPU session for ``path``, with all graph optimisations on.

    Args:
        path: an ONNX file.
        threads: intra-op threads (inter-op is then 1, for repeatable timings);
            ``None`` lets onnxruntime choose.
        config: extra session configuration entries (``SessionOptions.add_session_config_entry``).

    Returns:
        An ``onnxruntime.InferenceSession`` on the CPUExecutionProvider.

    Raises:
        KecompressError: onnxruntime cannot load the file.

    Example:
        >>> import tempfile, os
        >>> path = export_onnx(nn.Conv2d(3, 4, 3), os.path.join(tempfile.mkdtemp(), "c.onnx"),
        ...                    input_shape=(3, 8, 8))
        >>> onnx_session(path, threads=1).get_inputs()[0].name
        'input'
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads is not None:
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
    for key, value in (config or {}).items():
        options.add_session_config_entry(key, value)
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime raises its own exception types per failure
        raise KecompressError(f"onnxruntime cannot load {path} ({error.__class__.__name__}): "
                              "export the model again with kecompress.export.export_onnx") from None


def export_pair(dense: nn.Module, fit: nn.Module, out_dir: str | Path, input_shape=(3, 224, 224),
                batch_size: int = 1, opset: int | None = None, dynamic_batch: bool = False,
                tolerance: float = 1e-4, exporter: str = DEFAULT_EXPORTER) -> list[dict]:
    """Export the dense and the fit network to ``out_dir/dense.onnx`` and ``out_dir/fit.onnx``.

    Each file is checked in onnxruntime against PyTorch on one random input (seeded). The
    check passes when ``max|onnx - torch| <= tolerance * max|torch output|``: relative to the
    output's scale, because randomly initialised networks can output values as small as 1e-15,
    where any absolute tolerance would pass anything.

    Args:
        dense: the dense network.
        fit: its slim fit network (:func:`kecompress.slice_fit`).
        out_dir: directory for the two files; created if missing.
        input_shape, batch_size, opset, dynamic_batch, exporter: as in :func:`export_onnx`.
        tolerance: the largest difference allowed, relative to the largest output magnitude.

    Returns:
        One dict per network: ``name`` ("dense"/"fit"), ``path``, ``params``, ``macs``
        (multiply-accumulates per sample, torch-pruning's count), ``file_bytes``,
        ``max_abs_diff``, ``output_scale``, ``opset``, ``exporter``.

    Raises:
        KecompressError: an export fails, or a file differs from its model beyond ``tolerance``
            (naming the file and the difference).

    Example:
        >>> import tempfile, torchvision, kecompress
        >>> dense = torchvision.models.resnet18(num_classes=10)
        >>> x = torch.randn(1, 3, 64, 64)
        >>> fit = kecompress.slice_fit(dense, kecompress.split(dense, "kels", 0.5, x), x)
        >>> rows = export_pair(dense, fit, tempfile.mkdtemp(), input_shape=(3, 64, 64))
        >>> [row["name"] for row in rows], rows[0]["macs"] > 3 * rows[1]["macs"]
        (['dense', 'fit'], True)
    """
    out_dir = Path(out_dir)
    opset = _check_opset(opset, check_exporter(exporter))
    sample = example_input(dense, input_shape, batch_size)
    sample.copy_(torch.randn(sample.shape, generator=torch.Generator().manual_seed(0)))  # repeatable check
    rows = []
    for (name, model), file_name in zip((("dense", dense), ("fit", fit)), PAIR_FILES):
        path = export_onnx(model, out_dir / file_name, input_shape, batch_size, opset, dynamic_batch, exporter)
        difference, scale = _parity(model, path, sample)
        if difference > tolerance * scale:
            raise KecompressError(
                f"{path} differs from its PyTorch model by {difference:.3g} (outputs up to {scale:.3g}, "
                f"tolerance {tolerance:g} of that): the exporter mistranslated an operation; "
                "report it with the model name")
        with torch.no_grad():
            macs, params = tp.utils.count_ops_and_params(model, sample)
        rows.append({"name": name, "path": str(path), "params": int(params), "macs": int(macs),
                     "file_bytes": path.stat().st_size, "max_abs_diff": difference,
                     "output_scale": scale, "opset": opset, "exporter": exporter})
    return rows


def export_table(rows: list[dict]) -> Table:
    """A ``rich`` table of :func:`export_pair`'s rows, with the dense/fit ratios.

    Example:
        >>> table = export_table([{"name": "dense", "path": "d.onnx", "params": 4, "macs": 8,
        ...     "file_bytes": 100, "max_abs_diff": 0.0, "output_scale": 1.0, "opset": 17}])
        >>> table.row_count
        1
    """
    table = Table(title="ONNX export")
    for column in ("network", "file", "params", "MACs", "size", "max |onnx-torch|"):
        table.add_column(column, justify="left" if column in ("network", "file") else "right")
    for row in rows:
        table.add_row(row["name"], row["path"], f"{row['params'] / 1e6:.2f} M", f"{row['macs'] / 1e9:.3f} G",
                      f"{row['file_bytes'] / 2**20:.1f} MiB", f"{row['max_abs_diff']:.1e}")
    if len(rows) == 2 and all(row["macs"] and row["params"] for row in rows):
        dense, fit = rows
        table.add_row("dense/fit", "", f"{dense['params'] / fit['params']:.2f}x", f"{dense['macs'] / fit['macs']:.2f}x",
                      f"{dense['file_bytes'] / fit['file_bytes']:.2f}x", "")
    return table


def example_input(model: nn.Module, input_shape, batch_size: int = 1) -> torch.Tensor:
    """A random float batch of ``(batch_size, *input_shape)`` on ``model``'s device.

    Raises:
        KecompressError: a shape or batch size that is not made of positive integers.

    Example:
        >>> example_input(nn.Linear(4, 2), (4,), batch_size=3).shape
        torch.Size([3, 4])
    """
    try:
        shape = (int(batch_size), *(int(size) for size in input_shape))
    except (TypeError, ValueError):
        shape = ()
    if len(shape) < 2 or min(shape) < 1:
        raise KecompressError(f"input shape {input_shape!r} with batch size {batch_size!r} is not a "
                              "shape: give positive integers, e.g. input_shape=(3, 224, 224), batch_size=1")
    parameter = next(model.parameters(), None)
    return torch.randn(shape, device=parameter.device if parameter is not None else "cpu")


def _check_opset(opset, exporter: str) -> int:
    lowest = LOWEST_OPSET[exporter]
    if opset is None:
        return lowest
    try:
        value = int(opset)
        exact = float(opset) == value
    except (TypeError, ValueError):
        exact = False
    if not exact or not lowest <= value <= MAX_OPSET:
        raise KecompressError(f"ONNX opset must be an integer from {lowest} to {MAX_OPSET} for the {exporter} "
                              f"exporter, got {opset!r}: e.g. opset={lowest}")
    return value


def _as_arrays(output) -> list[np.ndarray]:
    if isinstance(output, torch.Tensor):
        return [output.detach().cpu().numpy()]
    if isinstance(output, (tuple, list)):
        return [array for item in output for array in _as_arrays(item)]
    raise KecompressError(f"the model returned a {type(output).__name__}; the parity check needs "
                          "tensors (or tuples of tensors)")
