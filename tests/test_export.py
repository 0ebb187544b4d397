import os
import stat

import onnx
import pytest
import torch
import torch.nn as nn

import kecompress
from kecompress import export
from kecompress.errors import KecompressError
from kecompress.export import check_onnx_parity, export_onnx, export_pair, export_table, onnx_session

from conftest import build, randomise_batchnorm

SHAPE = (3, 64, 64)


def dense_and_fit(name: str):
    dense = randomise_batchnorm(build(name))
    example = torch.randn(1, *SHAPE)
    fit = kecompress.slice_fit(dense, kecompress.split(dense, "kels", 0.5, example), example)
    return dense, fit


def tiny() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 2))


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "densenet121", "regnet_x_400mf"])
def test_dense_and_fit_match_pytorch_in_onnxruntime(name, tmp_path):
    dense, fit = dense_and_fit(name)
    rows = export_pair(dense, fit, tmp_path, SHAPE)
    assert [row["name"] for row in rows] == ["dense", "fit"]
    assert rows[1]["macs"] < rows[0]["macs"] / 2 and rows[1]["params"] < rows[0]["params"]
    for row, model in zip(rows, (dense, fit)):
        assert row["max_abs_diff"] <= 1e-4 * row["output_scale"]
        assert row["file_bytes"] == os.path.getsize(row["path"]) > 0
        # An independent input, through the public check.
        assert check_onnx_parity(model, row["path"], torch.randn(1, *SHAPE)) <= 1e-4 * row["output_scale"] + 1e-6
    assert sorted(os.listdir(tmp_path)) == ["dense.onnx", "fit.onnx"]


def test_dynamic_batch_axis_runs_batches_of_one_and_three(tmp_path):
    dense, _ = dense_and_fit("resnet18")
    path = export_onnx(dense, tmp_path / "m.onnx", SHAPE, dynamic_batch=True)
    for batch in (1, 3):
        x = torch.randn(batch, *SHAPE)
        (out,) = onnx_session(path).run(None, {"input": x.numpy()})
        assert out.shape == (batch, 10)
        assert check_onnx_parity(dense, path, x) < 1e-4


def test_static_batch_is_fixed_in_the_graph(tmp_path):
    path = export_onnx(tiny(), tmp_path / "m.onnx", (3, 8, 8), batch_size=2)
    assert onnx_session(path).get_inputs()[0].shape == [2, 3, 8, 8]


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_both_exporters_match_pytorch_with_a_free_batch(exporter, tmp_path):
    model = randomise_batchnorm(tiny())
    path = export_onnx(model, tmp_path / "m.onnx", (3, 8, 8), dynamic_batch=True, exporter=exporter)
    assert onnx.load(path).opset_import[0].version == {"dynamo": 18, "torchscript": 17}[exporter]
    assert check_onnx_parity(model, path, torch.randn(3, 3, 8, 8)) < 1e-5
    assert os.listdir(tmp_path) == ["m.onnx"]  # one self-contained file: no external weights beside it
    operations = [node.op_type for node in onnx.load(path).graph.node]
    assert "GlobalAveragePool" in operations and "ReduceMean" not in operations  # what INT8 kernels cover


def test_unknown_exporter_and_opset_17_of_dynamo_are_refused(tmp_path):
    with pytest.raises(KecompressError, match="unknown ONNX exporter 'onnxscript'"):
        export_onnx(tiny(), tmp_path / "m.onnx", (3, 8, 8), exporter="onnxscript")
    with pytest.raises(KecompressError, match="from 18 to 20 for the dynamo exporter"):
        export_onnx(tiny(), tmp_path / "m.onnx", (3, 8, 8), opset=17, exporter="dynamo")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("opset", [11, 16, 21, "x", 17.5])
def test_opset_outside_the_supported_range_is_refused(opset, tmp_path):
    with pytest.raises(KecompressError, match="opset"):
        export_onnx(tiny(), tmp_path / "m.onnx", (3, 8, 8), opset=opset)
    assert os.listdir(tmp_path) == []


def test_newer_opset_is_written(tmp_path):
    path = export_onnx(tiny(), tmp_path / "m.onnx", (3, 8, 8), opset=18)
    assert onnx.load(path).opset_import[0].version == 18


@pytest.mark.parametrize("stage", ["exporter", "checker"])
@pytest.mark.parametrize("existing", [True, False])
def test_failed_export_leaves_no_partial_file(stage, existing, tmp_path, monkeypatch):
    path = tmp_path / "m.onnx"
    if existing:
        path.write_bytes(b"the previous export")

    def fail(*args, **kwargs):
        if stage == "exporter":  # write half a file first, as a crash mid-export would
            with open(args[2], "wb") as handle:
                handle.write(b"half")
        raise RuntimeError("boom")

    if stage == "exporter":
        monkeypatch.setattr(export.torch.onnx, "export", fail)
    else:
        monkeypatch.setattr(export.onnx.checker, "check_model", fail)
    with pytest.raises(KecompressError, match="boom"):
        export_onnx(tiny(), path, (3, 8, 8))
    assert os.listdir(tmp_path) == (["m.onnx"] if existing else [])
    if existing:
        assert path.read_bytes() == b"the previous export"


def test_exported_file_gets_the_usual_permissions(tmp_path):
    umask = os.umask(0)
    os.umask(umask)
    path = export_onnx(tiny(), tmp_path / "m.onnx", (3, 8, 8))
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


def test_export_keeps_the_callers_train_and_eval_modes(tmp_path):
    model = tiny()
    model[1].eval()  # a frozen BatchNorm inside a training model
    export_onnx(model, tmp_path / "m.onnx", (3, 8, 8))
    check_onnx_parity(model, tmp_path / "m.onnx", torch.randn(1, 3, 8, 8))
    assert model.training and not model[1].training and model[0].training


def test_parity_beyond_tolerance_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(export, "_parity", lambda model, path, x: (0.5, 2.0))
    with pytest.raises(KecompressError, match=r"dense\.onnx differs .* by 0\.5"):
        export_pair(tiny(), tiny(), tmp_path, (3, 8, 8))


def test_bad_shape_and_unreadable_file_are_user_errors(tmp_path):
    with pytest.raises(KecompressError, match="input shape"):
        export_onnx(tiny(), tmp_path / "m.onnx", (3, 0, 8))
    (tmp_path / "bad.onnx").write_bytes(b"not onnx")
    with pytest.raises(KecompressError, match="bad.onnx"):
        check_onnx_parity(tiny(), tmp_path / "bad.onnx", torch.randn(1, 3, 8, 8))


def test_export_table_shows_both_networks_and_the_ratio(tmp_path):
    rows = export_pair(tiny(), tiny(), tmp_path, (3, 8, 8))
    assert export_table(rows).row_count == 3


@pytest.mark.parametrize("flag, opset", [([], 18), (["--exporter", "dynamo"], 18), (["--exporter", "torchscript"], 17)])
def test_export_command_takes_the_exporter(flag, opset, tmp_path, capsys):
    from kecompress.cli import main

    status = main(["export", "resnet18", "--num-classes", "10", "--input-size", "32", "--onnx", *flag,
                   "--out", str(tmp_path)])
    assert status == 0, capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["dense.onnx", "fit.onnx"]
    assert onnx.load(tmp_path / "fit.onnx").opset_import[0].version == opset
