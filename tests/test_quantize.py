import json
import os
import re

import onnxruntime as ort
import pytest
import torch
from PIL import Image
from torch.utils.data import TensorDataset

from kecompress import experiment, quantize
from kecompress.cli import main
from kecompress.errors import KecompressError
from kecompress.export import export_onnx, export_pair
from kecompress.node_kinds import graph_node_kinds
from kecompress.quantize import calibration_subset, onnx_top1, quantize_no_slower, quantize_pair
from kecompress.rundir import RunDirectory

from test_export import tiny

# A tiny trained run: ResNet18 on the demo digits at 16 px, one generation of three epochs.
SIZE = "16"
# The INT8 fit may differ from the fp32 fit by this many points of top-1 on the run's 359 validation
# images (measured, 64 calibration images: the fit 56.3% in both, the dense network 90.5% against 90.3%).
TOLERANCE_POINTS = 3.0


def int8_twice_as_fast(fp32_path, int8_path, images):
    """A timer for quantize_no_slower: INT8 always wins, so tests of other things get their INT8 files
    whatever the machine's speed."""
    return 2.0, 1.0


@pytest.fixture
def int8_wins(monkeypatch):
    monkeypatch.setattr(quantize, "time_fp32_int8", int8_twice_as_fast)


def run(capsys, *argv):
    status = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "digits"
    assert main(["evolve", "resnet18", "--image-size", SIZE, "--generations", "1", "--epochs", "3",
                 "--batch-size", "64", "--out", str(out)]) == 0
    return out


def test_int8_files_of_a_run_load_and_agree_with_fp32(trained_run, tmp_path, capsys, int8_wins):
    out = tmp_path / "onnx"
    status, stdout, err = run(capsys, "export", trained_run, "--onnx", "--int8", "--exporter", "torchscript",
                              "--calibration-images", "64", "--out", out)
    assert status == 0, err
    assert sorted(os.listdir(out)) == ["dense.int8.onnx", "dense.onnx", "fit.int8.onnx", "fit.onnx"]
    printed = " ".join(stdout.split())
    assert "fit top-1 on 359 validation images" in printed and "CPU:" in printed
    _, validation, _ = experiment.load_data(RunDirectory(trained_run).read_config())
    for name in ("dense", "fit"):
        ort.InferenceSession(str(out / f"{name}.int8.onnx"), providers=["CPUExecutionProvider"])
        fp32, int8 = onnx_top1(out / f"{name}.onnx", validation), onnx_top1(out / f"{name}.int8.onnx", validation)
        assert fp32 > 0.2 and abs(fp32 - int8) * 100 <= TOLERANCE_POINTS, (name, fp32, int8)
    assert (out / "fit.int8.onnx").stat().st_size < (out / "fit.onnx").stat().st_size / 3


def test_too_large_an_accuracy_drop_writes_nothing(trained_run, tmp_path, capsys, monkeypatch, int8_wins):
    # The INT8 fit scores 10 points below the fp32 fit, whatever the networks do.
    monkeypatch.setattr(quantize, "onnx_top1", lambda path, data: 0.9 if str(path).endswith("fit.onnx") else 0.8)
    out = tmp_path / "onnx"
    status, _, err = run(capsys, "export", trained_run, "--onnx", "--int8", "--exporter", "torchscript",
                         "--calibration-images", "8", "--out", out)
    assert status == 2 and err.count("\n") == 1
    assert "loses 10.00 points" in err and "more than the 1 allowed" in err
    assert os.listdir(out) == []  # neither INT8 nor fp32 files, nor the staging directory


def test_quantize_pair_refusal_leaves_the_fp32_files_alone(tmp_path, monkeypatch, int8_wins):
    export_pair(tiny(), tiny(), tmp_path, (3, 8, 8), exporter="torchscript")
    images = TensorDataset(torch.randn(6, 3, 8, 8), torch.zeros(6, dtype=torch.long))
    monkeypatch.setattr(quantize, "onnx_top1", lambda path, data: 1.0 if str(path).endswith("fit.onnx") else 0.995)
    with pytest.raises(KecompressError, match="0.50 points"):
        quantize_pair(tmp_path, images, images, max_accuracy_drop=0)
    assert sorted(os.listdir(tmp_path)) == ["dense.onnx", "fit.onnx"]
    assert [path.name for path in quantize_pair(tmp_path, images, images, max_accuracy_drop=0.5).paths] == \
        ["dense.int8.onnx", "fit.int8.onnx"]


def test_bench_int8_json_has_the_int8_speedup_beside_the_fp32_one(trained_run, capsys, int8_wins):
    status, stdout, err = run(capsys, "bench", trained_run, "--int8", "--json", "--runtime", "onnxruntime",
                              "--exporter", "torchscript", "--calibration-images", "8", "--warmup", "0", "--runs", "2")
    assert status == 0, err
    result = json.loads(stdout)
    row = result["results"][0]
    assert row["int8_ort_speedup"] > 0 and row["ort_speedup"] > 0 and row["ort_int8_fit_median_ms"] > 0
    assert row["int8_ort_speedup"] == pytest.approx(row["ort_dense_median_ms"] / row["ort_int8_fit_median_ms"])
    assert result["settings"]["int8_calibration_images"] == 8 and "cpu_flags" in result["machine"]
    assert row["ort_int8_fit_written"] and row["ort_int8_fit_kept_fp32"] == []  # INT8 won with every kind quantised


def test_calibration_folder_of_an_untrained_model(tmp_path, capsys, int8_wins):
    folder = tmp_path / "images"
    for name in ("cat", "dog"):
        (folder / name).mkdir(parents=True)
        for index in range(3):
            Image.new("RGB", (40, 40), (index * 80, 0, 0)).save(folder / name / f"{index}.png")
    status, stdout, err = run(capsys, "export", "resnet18", "--input-size", "32", "--onnx", "--int8",
                              "--exporter", "torchscript", "--calibration-data", folder, "--out", tmp_path / "onnx")
    assert status == 0, err
    assert "warning" not in err and "accuracy not checked" in " ".join(stdout.split())
    assert (tmp_path / "onnx" / "fit.int8.onnx").is_file()


@pytest.mark.parametrize("command", ["export", "bench"])
def test_a_bad_calibration_path_is_one_line(command, tmp_path, capsys):
    extra = ["--onnx", "--out", tmp_path / "onnx"] if command == "export" else []
    status, _, err = run(capsys, command, "resnet18", "--input-size", "32", "--int8", "--exporter", "torchscript",
                         "--calibration-data", tmp_path / "missing", *extra)
    assert status == 2 and err.count("\n") == 1 and "--calibration-data" in err and "is not a directory" in err
    assert not (tmp_path / "onnx").exists()


def test_calibration_subset_is_seeded_and_bounded():
    data = TensorDataset(torch.arange(10.0), torch.arange(10))
    assert calibration_subset(data, 4).indices == calibration_subset(data, 4).indices
    assert len(calibration_subset(data, 100)) == 10
    with pytest.raises(KecompressError, match="calibration images"):
        calibration_subset(data, 0)


def test_without_calibration_data_an_untrained_model_calibrates_on_the_digits_with_a_warning(capsys):
    from kecompress.cli import _int8_data

    calibration, validation = _int8_data("resnet18", None, (3, 16, 16))
    assert validation is None and calibration[0][0].shape == (3, 16, 16)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "warning: no --calibration-data" in err


def depthwise_net() -> torch.nn.Module:
    nn = torch.nn
    return nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3, groups=16), nn.ReLU(),
                         nn.Conv2d(16, 16, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 2)).eval()


def fp32_convs(path) -> dict[str, bool]:
    """Per Conv node of an INT8 graph: whether it computes in fp32 (its weight is a float
    initializer, not the output of a DequantizeLinear)."""
    import onnx
    graph = onnx.load(str(path)).graph
    dequantized = {output for node in graph.node if node.op_type == "DequantizeLinear" for output in node.output}
    return {node.name: node.input[1] not in dequantized for node in graph.node if node.op_type == "Conv"}


def slower_unless_depthwise_is_fp32(fp32_path, int8_path, images):
    # quantize_no_slower names each candidate file by the kinds it keeps in fp32
    return 1.0, 0.8 if "depthwise" in int8_path.name else 1.25


def test_int8_keeps_a_losing_kind_in_fp32_until_it_is_no_slower(tmp_path):
    fp32 = export_onnx(depthwise_net(), tmp_path / "m.onnx", (3, 12, 12), exporter="torchscript")
    images = TensorDataset(torch.randn(8, 3, 12, 12), torch.zeros(8, dtype=torch.long))
    speed = quantize_no_slower(fp32, tmp_path / "m.int8.onnx", images, timer=slower_unless_depthwise_is_fp32)
    assert speed.written and speed.kept_fp32 == ("depthwise",) and speed.speedup == 1.25
    convs = fp32_convs(tmp_path / "m.int8.onnx")
    kinds = graph_node_kinds(fp32)
    assert [kinds[name] for name, in_fp32 in convs.items() if in_fp32] == ["depthwise conv"]
    assert sum(not in_fp32 for in_fp32 in convs.values()) == 2  # the two kxk convs are INT8
    assert sorted(os.listdir(tmp_path)) == ["m.int8.onnx", "m.onnx"]  # no candidate left behind


def test_the_user_s_kinds_override_the_timing(tmp_path):
    fp32 = export_onnx(depthwise_net(), tmp_path / "m.onnx", (3, 12, 12), exporter="torchscript")
    images = TensorDataset(torch.randn(8, 3, 12, 12), torch.zeros(8, dtype=torch.long))
    speed = quantize_no_slower(fp32, tmp_path / "m.int8.onnx", images, keep_fp32="kxk",
                               timer=lambda fp32, int8, x: (1.0, 3.0))  # far slower: written all the same
    assert speed.written and speed.kept_fp32 == ("kxk",)
    kinds = graph_node_kinds(fp32)
    assert sorted(kinds[name] for name, in_fp32 in fp32_convs(tmp_path / "m.int8.onnx").items() if in_fp32) == \
        ["kxk conv", "kxk conv"]


def test_an_int8_network_that_stays_slower_is_not_written_and_says_why(tmp_path, capsys, monkeypatch):
    out = tmp_path / "onnx"
    out.mkdir()
    (out / "fit.int8.onnx").write_bytes(b"an earlier export's")
    monkeypatch.setattr(quantize, "time_fp32_int8", lambda fp32, int8, x: (1.0, 2.0))
    status, stdout, err = run(capsys, "export", "mobilenet_v3_small", "--input-size", "32", "--onnx", "--int8",
                              "--exporter", "torchscript", "--calibration-images", "4", "--out", out, "--force")
    assert status == 0, err
    assert sorted(os.listdir(out)) == ["dense.onnx", "fit.onnx"]  # the stale INT8 file is gone too
    printed = " ".join(stdout.split())
    assert "fit.int8.onnx not written: INT8 ran at 0.50x the fp32 speed on this CPU" in printed
    assert "dense.int8.onnx not written" in printed and "no INT8 file written" in printed


def test_int8_keep_fp32_on_the_command_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(quantize, "time_fp32_int8", lambda fp32, int8, x: (1.0, 2.0))
    out = tmp_path / "onnx"
    status, stdout, err = run(capsys, "export", "mobilenet_v3_small", "--input-size", "32", "--onnx", "--int8",
                              "--int8-keep-fp32", "depthwise,squeeze-excitation", "--exporter", "torchscript",
                              "--calibration-images", "4", "--out", out)
    assert status == 0, err
    assert "fit.int8.onnx: 0.50x the fp32 speed" in " ".join(stdout.split())
    kinds = graph_node_kinds(out / "fit.onnx")
    in_fp32 = fp32_convs(out / "fit.int8.onnx")
    assert {kinds[name] for name, fp32 in in_fp32.items() if fp32} == {"depthwise conv", "squeeze-excitation"}
    assert not any(fp32 for name, fp32 in in_fp32.items() if kinds[name] in ("1x1 conv", "small 1x1 conv"))


@pytest.mark.parametrize("argv, message", [(["--int8", "--int8-keep-fp32", "depthwise,wide"], "'wide'"),
                                           (["--int8-keep-fp32", "depthwise"], "pass --int8 too")])
def test_a_bad_int8_keep_fp32_is_one_line(argv, message, tmp_path, capsys):
    status, _, err = run(capsys, "export", "resnet18", "--input-size", "32", "--onnx", *argv,
                         "--out", tmp_path / "onnx")
    assert status == 2 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "onnx").exists()


def test_bench_times_the_int8_networks_export_writes(capsys, monkeypatch):
    # the same rule as export: INT8 loses until the depthwise convolutions stay in fp32
    monkeypatch.setattr(quantize, "time_fp32_int8", slower_unless_depthwise_is_fp32)
    argv = ["bench", "mobilenet_v3_small", "--input-size", "32", "--int8", "--runtime", "onnxruntime",
            "--exporter", "torchscript", "--calibration-images", "4", "--warmup", "0", "--runs", "2"]
    status, stdout, err = run(capsys, *argv)
    assert status == 0, err
    printed = " ".join(stdout.split())
    for name in ("dense", "fit"):
        assert re.search(rf"batch 1 INT8 {name}: [\d.]+ ms against fp32 [\d.]+ ms, [\d.]+x its speed "
                         r"\(export's check: 1.25x\), depthwise convolutions kept in fp32", printed), printed
    status, stdout, err = run(capsys, *argv, "--json")
    assert status == 0, err
    row = json.loads(stdout)["results"][0]
    for name in ("dense", "fit"):
        assert row[f"ort_int8_{name}_written"] and row[f"ort_int8_{name}_kept_fp32"] == ["depthwise"]
        assert row[f"ort_int8_{name}_median_ms"] > 0 and row[f"ort_int8_{name}_check_speedup"] == 1.25
    assert row["int8_ort_speedup"] == pytest.approx(row["ort_dense_median_ms"] / row["ort_int8_fit_median_ms"])


def test_bench_says_when_no_int8_network_beats_fp32_and_times_none(capsys, monkeypatch):
    timed = []
    monkeypatch.setattr(quantize, "time_fp32_int8", lambda fp32, int8, x: timed.append(int8.name) or (1.0, 2.0))
    status, stdout, err = run(capsys, "bench", "mobilenet_v3_small", "--input-size", "32", "--int8",
                              "--runtime", "onnxruntime", "--exporter", "torchscript", "--calibration-images", "4",
                              "--warmup", "0", "--runs", "2")
    assert status == 0, err
    printed = " ".join(stdout.split())
    for name in ("dense", "fit"):  # keeping a kind in fp32 did not help: the best is every kind quantised
        assert (f"batch 1 INT8 {name}: none, no INT8 network beats fp32 on this CPU (at best 0.50x its speed, with "
                "every kind quantised): export --int8 writes none, so none is timed") in printed
    # each losing kind the networks have was tried, one after the other, as export tries them
    assert timed == ["all.int8.onnx", "depthwise.int8.onnx", "squeeze-excitation.int8.onnx",
                     "small-1x1.int8.onnx"] * 2


def test_bench_int8_keep_fp32_overrides_the_timing(capsys, monkeypatch):
    monkeypatch.setattr(quantize, "time_fp32_int8", lambda fp32, int8, x: (1.0, 2.0))  # slower: timed all the same
    status, stdout, err = run(capsys, "bench", "mobilenet_v3_small", "--input-size", "32", "--int8", "--json",
                              "--int8-keep-fp32", "squeeze-excitation", "--runtime", "onnxruntime",
                              "--exporter", "torchscript", "--calibration-images", "4", "--warmup", "0", "--runs", "2")
    assert status == 0, err
    result = json.loads(stdout)
    row = result["results"][0]
    assert row["ort_int8_fit_kept_fp32"] == ["squeeze-excitation"] and row["ort_int8_fit_median_ms"] > 0
    assert result["settings"]["int8_keep_fp32"] == ["squeeze-excitation"]


@pytest.mark.parametrize("argv, message", [(["--int8", "--int8-keep-fp32", "wide"], "'wide'"),
                                           (["--int8-keep-fp32", "depthwise"], "pass --int8 too")])
def test_a_bad_bench_int8_keep_fp32_is_one_line(argv, message, capsys):
    status, _, err = run(capsys, "bench", "resnet18", "--input-size", "32", *argv)
    assert status == 2 and err.count("\n") == 1 and message in err, err
