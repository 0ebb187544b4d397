import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from kecompress.cli import main

from conftest import terminal_sigint_in_child

FAST = ["--generations", "2", "--epochs", "1", "--batch-size", "64"]


def run(capsys, *argv):
    status = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def snapshot(directory: Path) -> dict:
    return {p: p.read_bytes() for p in directory.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "demo"
    status = main(["evolve", "mobilenet_v3_small", "--split", "kels", "--rate", "0.5", *FAST, "--out", str(out)])
    assert status == 0
    return out


def test_evolve_on_the_demo_data_writes_a_complete_run(finished_run):
    metrics = json.loads((finished_run / "metrics.json").read_text())["generations"]
    assert [g["generation"] for g in metrics] == [1, 2]
    for record in metrics:
        assert 0 <= record["dense_accuracy"] <= 1 and 0 <= record["fit_accuracy"] <= 1
        assert record["fit_parameters"] < record["dense_parameters"]
    config = json.loads((finished_run / "config.json").read_text())
    assert (config["split"], config["rate"], config["arch"], config["num_classes"]) == ("kels", 0.5, "mobilenet_v3_small", 10)
    for name in ("split.pt", "checkpoint.pt", "dense.pt", "fit.pt"):
        assert (finished_run / name).is_file()


def test_a_finished_run_reloads_in_a_fresh_process(finished_run):
    code = (
        "import sys, torch; from kecompress.rundir import load_run, load_fit\n"
        "dense, split, config = load_run(sys.argv[1]); fit = load_fit(sys.argv[1] + '/fit.pt')\n"
        "x = torch.randn(2, 3, 32, 32)\n"
        "print(tuple(dense(x).shape), tuple(fit(x).shape), sum(p.numel() for p in fit.parameters()) == split.fit_count())\n")
    result = subprocess.run([sys.executable, "-c", code, str(finished_run)], capture_output=True, text=True, check=True)
    assert result.stdout.split("\n")[0] == "(2, 10) (2, 10) True"


def test_resume_of_a_finished_run_changes_nothing(finished_run, capsys):
    metrics = (finished_run / "metrics.json").read_text()
    status, _, err = run(capsys, "evolve", "mobilenet_v3_small", "--rate", "0.5", *FAST, "--out", finished_run, "--resume")
    assert status == 0, err
    assert (finished_run / "metrics.json").read_text() == metrics


def test_a_wels_run_from_a_model_file_on_an_image_folder(tmp_path, capsys):
    # An ImageFolder data set of real images: scikit-learn's digits written out as PNG files.
    from sklearn.datasets import load_digits
    digits = load_digits()
    for split_name in ("train", "val"):
        for label in (3, 5, 8):
            (tmp_path / "data" / split_name / f"digit{label}").mkdir(parents=True)
    counts = {}
    for image, label in zip(digits.images, digits.target):
        if label in (3, 5, 8) and counts.get(label, 0) < 24:
            counts[label] = counts.get(label, 0) + 1
            split_name = "val" if counts[label] % 4 == 0 else "train"
            pixels = (image * 16).clip(0, 255).astype(np.uint8)
            Image.fromarray(pixels).resize((36, 36)).convert("RGB").save(
                tmp_path / "data" / split_name / f"digit{label}" / f"{counts[label]}.png")
    model_file = tmp_path / "model.pt"
    torch.save(torchvision.models.resnet18(num_classes=3), model_file)
    before = model_file.read_bytes()
    out = tmp_path / "run"
    status, stdout, err = run(capsys, "evolve", model_file, "--split", "wels", "--rate", "0.3",
                              "--data", tmp_path / "data", "--image-size", "32", *FAST, "--out", out)
    assert status == 0, err
    assert model_file.read_bytes() == before
    metrics = json.loads((out / "metrics.json").read_text())["generations"]
    assert len(metrics) == 2 and not (out / "fit.pt").exists()  # WELS: sparse, nothing to slice


def test_the_console_script_and_python_m_work():
    for command in (["kecompress", "--help"], [sys.executable, "-m", "kecompress", "evolve", "--help"]):
        exe = Path(sys.executable).parent / command[0] if command[0] == "kecompress" else None
        argv = [str(exe)] + command[1:] if exe else command
        result = subprocess.run(argv, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        assert "evolve" in result.stdout
    result = subprocess.run([sys.executable, "-m", "kecompress", "evolve", "resnet18", "--rate", "2"],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "rate" in result.stderr


def test_ctrl_c_stops_with_a_checkpoint_and_prints_the_resume_command(tmp_path):
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "kecompress", "evolve", "mobilenet_v3_small", "--generations", "2",
            "--epochs", "3", "--out", str(out)]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=terminal_sigint_in_child)
    deadline = time.time() + 120
    while not (out / "config.json").exists() and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(2)  # inside the first epoch
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "a checkpoint was saved; resume with: kecompress evolve mobilenet_v3_small" in err
    assert err.strip().endswith("--resume") and "Traceback" not in err
    assert (out / "checkpoint.pt").is_file()


def test_export_of_a_finished_run_writes_checked_onnx_files(finished_run, tmp_path, capsys):
    status, stdout, err = run(capsys, "export", finished_run, "--onnx", "--out", tmp_path / "onnx")
    assert status == 0, err
    assert (tmp_path / "onnx" / "dense.onnx").is_file() and (tmp_path / "onnx" / "fit.onnx").is_file()
    assert "fit" in stdout and "MACs" in stdout
    import onnxruntime as ort
    fit = ort.InferenceSession(str(tmp_path / "onnx" / "fit.onnx"), providers=["CPUExecutionProvider"])
    assert fit.get_inputs()[0].shape == [1, 3, 32, 32]  # the run's input size


def test_export_of_an_untrained_model_with_a_dynamic_batch(tmp_path, capsys):
    status, _, err = run(capsys, "export", "mobilenet_v3_small", "--split", "kels", "--rate", "0.5", "--onnx",
                         "--input-size", "64", "--dynamic-batch", "--out", tmp_path)
    assert status == 0, err
    import numpy as np
    import onnxruntime as ort
    session = ort.InferenceSession(str(tmp_path / "fit.onnx"), providers=["CPUExecutionProvider"])
    assert session.run(None, {"input": np.zeros((3, 3, 64, 64), np.float32)})[0].shape == (3, 1000)


def test_bench_prints_json_per_batch_size(finished_run, capsys):
    status, stdout, err = run(capsys, "bench", finished_run, "--json", "--batch-size", "1", "--batch-size", "4",
                              "--warmup", "1", "--runs", "3")
    assert status == 0, err
    result = json.loads(stdout)
    assert [r["batch_size"] for r in result["results"]] == [1, 4]
    for row in result["results"]:
        assert row["macs_ratio"] > 2.5 and row["ort_speedup"] > 0 and row["torch_speedup"] > 0


def test_evolve_with_align_keeps_multiples_and_records_it(tmp_path, capsys):
    from kecompress import Split
    from kecompress.rundir import load_fit
    out = tmp_path / "run"
    status, stdout, err = run(capsys, "evolve", "mobilenet_v3_small", "--align", "16", "--generations", "1",
                              "--epochs", "1", "--batch-size", "64", "--out", out)
    assert status == 0, err
    banner = " ".join(stdout.split())  # rich wraps long lines
    assert "KELS split at rate 0.5 aligned to 16 channels, fit " in banner and "(rate² 25.0%)" in banner
    assert json.loads((out / "config.json").read_text())["align"] == 16
    split = Split.load(out / "split.pt")
    assert split.align == 16
    for name, mask in split.masks.items():
        if mask.dim() == 4:  # every conv keeps a multiple of 16 output channels, or all of them
            kept = int(mask.flatten(1).any(dim=1).sum())
            assert kept % 16 == 0 or kept == mask.shape[0], name
    assert sum(p.numel() for p in load_fit(out / "fit.pt").parameters()) == split.fit_count()
    status, _, err = run(capsys, "evolve", "mobilenet_v3_small", "--align", "8", "--generations", "1",
                         "--epochs", "1", "--batch-size", "64", "--out", out, "--resume")
    assert status == 2 and "differs in align" in err


def test_bench_of_an_untrained_model_with_align_prints_the_split(capsys):
    status, stdout, err = run(capsys, "bench", "mobilenet_v3_small", "--align", "16", "--input-size", "64",
                              "--runtime", "torch", "--warmup", "0", "--runs", "1")
    assert status == 0, err
    assert "aligned to 16 channels" in " ".join(stdout.split())


@pytest.mark.parametrize("command", [["evolve", "resnet18"], ["export", "resnet18", "--onnx"], ["bench", "resnet18"]])
def test_align_zero_is_refused(command, capsys):
    status, _, err = run(capsys, *command, "--align", "0")
    assert status == 2 and "--align" in err and err.strip().count("\n") == 0


def test_evolve_records_how_grouped_convolutions_are_cut_and_old_runs_resume_narrow(tmp_path, capsys):
    from kecompress import Split
    from kecompress.rundir import load_fit
    out = tmp_path / "run"
    argv = ["evolve", "regnet_x_400mf", "--generations", "1", "--epochs", "1", "--image-size", "16",
            "--batch-size", "256", "--out", out]
    status, _, err = run(capsys, *argv, "--grouped", "narrow")
    assert status == 0, err
    assert json.loads((out / "config.json").read_text())["grouped"] == "narrow"
    split = Split.load(out / "split.pt")
    assert split.grouped == "narrow"
    fit = load_fit(out / "fit.pt")
    assert fit.get_submodule("trunk_output.block2.block2-0.f.b.0").groups == 4  # every group, narrowed
    status, _, err = run(capsys, *argv, "--resume", "--grouped", "whole-groups")
    assert status == 2 and "differs in grouped" in err
    # A run directory written before --grouped existed (and before its manifest): it narrowed every group, and
    # resumes so.
    (out / "manifest.json").unlink()
    config = json.loads((out / "config.json").read_text())
    del config["grouped"]
    (out / "config.json").write_text(json.dumps(config))
    state = torch.load(out / "split.pt", weights_only=True)
    del state["grouped"]
    torch.save(state, out / "split.pt")
    status, _, err = run(capsys, *argv, "--resume")  # no --grouped: the run's own
    assert status == 0, err
    assert Split.load(out / "split.pt").grouped == "narrow"
