"""Every subcommand, fed bad input: one line naming the problem and the fix, exit status 2,
no traceback, and every file of the user's left as it was."""

import os
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torchvision

from kecompress.cli import main


class RunsACommand:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("user")
    paths = {name: root / name for name in (
        "missing.pt", "empty.pt", "notes.pt", "weights.pt", "truncated.pt", "list.pt", "evil.pt", "five.pt", "flat.pt", "mlp.pt",
        "no_data", "empty_dir", "used", "unfinished", "damaged", "one_class", "bad_images", "exported", "a_dir.pt")}
    paths["empty.pt"].write_bytes(b"")
    paths["notes.pt"].write_text("not a model\n")
    torch.save(nn.Linear(2, 2).state_dict(), paths["weights.pt"])
    torch.save(torchvision.models.resnet18(num_classes=5), paths["five.pt"])
    paths["truncated.pt"].write_bytes(paths["five.pt"].read_bytes()[:100_000])
    torch.save([1, 2, 3], paths["list.pt"])
    torch.save(nn.Sequential(nn.Flatten(), nn.Linear(12, 10)), paths["flat.pt"])  # takes 12 numbers, not images
    torch.save(nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10)), paths["mlp.pt"])  # images, no convolution
    torch.save(RunsACommand(), paths["evil.pt"])
    for name in ("empty_dir", "used", "unfinished", "damaged", "exported", "a_dir.pt"):
        paths[name].mkdir()
    (paths["used"] / "notes.txt").write_text("my notes\n")
    (paths["unfinished"] / "config.json").write_text('{"arch": "resnet18", "num_classes": 10, "image_size": 32}')
    (paths["damaged"] / "config.json").write_text('{"arch": "resn')
    (paths["exported"] / "dense.onnx").write_bytes(b"my earlier export")
    for cls in ("cat",):
        (paths["one_class"] / cls).mkdir(parents=True)
        for i in range(3):
            from PIL import Image
            Image.new("RGB", (20, 20), (i * 40, 0, 0)).save(paths["one_class"] / cls / f"{i}.png")
    for cls in ("cat", "dog"):
        (paths["bad_images"] / cls).mkdir(parents=True)
        for i in range(3):
            (paths["bad_images"] / cls / f"{i}.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    return root, {name.replace(".", "_"): str(path) for name, path in paths.items()}


EVOLVE = [
    (["evolve"], "missing argument"),
    (["evolve", "no_such_net"], "unknown"),
    (["evolve", "resnet18", "--rate", "0"], "rate"),
    (["evolve", "resnet18", "--rate", "1.5"], "rate"),
    (["evolve", "resnet18", "--rate", "half"], "rate"),
    (["evolve", "resnet18", "--split", "random"], "split"),
    (["evolve", "resnet18", "--generations", "0"], "generations"),
    (["evolve", "resnet18", "--epochs", "0"], "epochs"),
    (["evolve", "resnet18", "--epochs", "two"], "epochs"),
    (["evolve", "resnet18", "--batch-size", "0"], "batch-size"),
    (["evolve", "resnet18", "--lr", "-1"], "--lr"),
    (["evolve", "resnet18", "--warmup-epochs", "10", "--epochs", "10"], "warm-up epochs"),
    (["evolve", "resnet18", "--target-accuracy", "90"], "target-accuracy"),
    (["evolve", "resnet18", "--device", "tpu"], "device"),
    (["evolve", "resnet18", "--device", "cuda"], "no cuda"),
    (["evolve", "resnet18", "--num-classes", "5"], "5 outputs but the data has 10 classes"),
    (["evolve", "{five_pt}"], "5 outputs but the data has 10 classes"),
    (["evolve", "{missing_pt}"], "does not exist"),
    (["evolve", "{empty_pt}"], "empty"),
    (["evolve", "{notes_pt}"], "not"),
    (["evolve", "{truncated_pt}"], "truncated"),
    (["evolve", "{weights_pt}"], "state_dict"),
    (["evolve", "{list_pt}"], "list"),
    (["evolve", "{evil_pt}"], "--trust-model-file"),
    (["evolve", "{a_dir_pt}"], "directory"),
    (["evolve", "resnet18", "--data", "{no_data}"], "does not exist"),
    (["evolve", "resnet18", "--data", "{empty_dir}"], "empty"),
    (["evolve", "resnet18", "--data", "{notes_pt}"], "is a file"),
    (["evolve", "resnet18", "--data", "{one_class}"], "two classes"),
    (["evolve", "resnet18", "--data", "{bad_images}", "--image-size", "16", "--epochs", "1", "--generations", "1"],
     "decode"),
    (["evolve", "resnet18", "--image-size", "3"], "image-size"),
    (["evolve", "resnet18", "--augment", "mixup"], "--augment"),
    (["evolve", "resnet18", "--crop-scale", "0.5", "0.2"], "crop scale"),
    (["evolve", "resnet18", "--workers", "-1"], "--workers"),
    (["evolve", "resnet18", "--weights", "{notes_pt}"], "cannot read weights"),
    (["evolve", "resnet18", "--out", "{notes_pt}"], "is a file"),
    (["evolve", "resnet18", "--out", "{used}"], "--resume"),
    (["evolve", "resnet18", "--out", "{empty_dir}", "--resume"], "nothing to resume"),
    (["evolve", "resnet18", "--no-such-option"], "no such option"),
    (["evolve", "{flat_pt}"], "input"),
    (["evolve", "resnet18", "--out", "/sys/kecompress-run"], "cannot read or write"),
    (["evolve", "shufflenet_v2_x0_5"], "dependency graph"),
    (["evolve", "resnet18", "--precision", "fp8"], "precision"),
    (["evolve", "{mlp_pt}", "--channels-last"], "drop --channels-last"),
    (["evolve", "resnet18", "--forget", "llf", "--forget-from", "nosuch"],
     "nosuch names no module of this model: pass one of conv1, layer1, layer2, layer3, layer4, fc"),
    (["evolve", "{mlp_pt}", "--forget", "llf"], "pass --forget-from"),
    (["evolve", "resnet18", "--forget", "shrink-perturb", "--shrink", "2"], "--shrink"),
    (["evolve", "resnet18", "--forget", "shrink-perturb", "--perturb", "-0.1"], "--perturb"),
    (["evolve", "resnet18", "--forget-from", "layer4"], "applies to --forget llf"),
    (["evolve", "resnet18", "--forget", "none", "--shrink", "0.5"], "applies to --forget shrink-perturb"),
    (["evolve", "resnet18", "--forget", "everything"], "--forget"),
    (["evolve", "resnet18", "--fit-only", "--split", "wels"], "drop --split wels"),
    (["evolve", "resnet18", "--fit-only", "--finetune-fit", "2", "--distill-fit"], "drop --distill-fit and --finetune-fit"),
    (["evolve", "resnet18", "--fit-only", "--weights", "{weights_pt}"], "drop --weights"),
]

EXPORT = [
    (["export"], "missing argument"),
    (["export", "resnet18"], "--onnx"),
    (["export", "no_such_net", "--onnx"], "unknown"),
    (["export", "{missing_pt}", "--onnx"], "does not exist"),
    (["export", "{empty_pt}", "--onnx"], "empty"),
    (["export", "{notes_pt}", "--onnx"], "not"),
    (["export", "{truncated_pt}", "--onnx"], "truncated"),
    (["export", "{weights_pt}", "--onnx"], "state_dict"),
    (["export", "{list_pt}", "--onnx"], "list"),
    (["export", "{evil_pt}", "--onnx"], "--trust-model-file"),
    (["export", "{a_dir_pt}", "--onnx"], "directory"),
    (["export", "{unfinished}", "--onnx"], "has not finished"),
    (["export", "{damaged}", "--onnx"], "damaged"),
    (["export", "resnet18", "--onnx", "--rate", "0"], "rate"),
    (["export", "resnet18", "--onnx", "--rate", "2"], "rate"),
    (["export", "resnet18", "--onnx", "--rate", "x"], "rate"),
    (["export", "resnet18", "--onnx", "--split", "other"], "split"),
    (["export", "resnet18", "--onnx", "--split", "wels"], "sparse, not slim"),
    (["export", "resnet18", "--onnx", "--opset", "11"], "opset"),
    (["export", "resnet18", "--onnx", "--opset", "x"], "opset"),
    (["export", "resnet18", "--onnx", "--batch-size", "0"], "batch-size"),
    (["export", "resnet18", "--onnx", "--input-size", "0"], "input"),
    (["export", "resnet18", "--onnx", "--num-classes", "0"], "classes"),
    (["export", "resnet18", "--onnx", "--out", "{notes_pt}"], "is a file"),
    (["export", "resnet18", "--onnx", "--out", "{exported}"], "--force"),
    (["export", "shufflenet_v2_x0_5", "--onnx"], "dependency graph"),
    (["export", "resnet18", "--onnx", "--no-such-option"], "no such option"),
    (["export", "{flat_pt}", "--onnx"], "input"),
    (["export", "resnet18", "--onnx", "--input-size", "32", "--out", "/sys/kecompress-onnx"], "cannot read or write"),
]

BENCH = [
    (["bench"], "missing argument"),
    (["bench", "no_such_net"], "unknown"),
    (["bench", "{missing_pt}"], "does not exist"),
    (["bench", "{empty_pt}"], "empty"),
    (["bench", "{notes_pt}"], "not"),
    (["bench", "{truncated_pt}"], "truncated"),
    (["bench", "{weights_pt}"], "state_dict"),
    (["bench", "{list_pt}"], "list"),
    (["bench", "{evil_pt}"], "--trust-model-file"),
    (["bench", "{a_dir_pt}"], "directory"),
    (["bench", "{unfinished}"], "has not finished"),
    (["bench", "{damaged}"], "damaged"),
    (["bench", "resnet18", "--rate", "0"], "rate"),
    (["bench", "resnet18", "--rate", "1.5"], "rate"),
    (["bench", "resnet18", "--rate", "x"], "rate"),
    (["bench", "resnet18", "--split", "other"], "split"),
    (["bench", "resnet18", "--split", "wels"], "sparse, not slim"),
    (["bench", "resnet18", "--batch-size", "0"], "batch"),
    (["bench", "resnet18", "--batch-size", "x"], "batch-size"),
    (["bench", "resnet18", "--threads", "0"], "threads"),
    (["bench", "resnet18", "--warmup", "-1"], "warm"),
    (["bench", "resnet18", "--runs", "0"], "runs"),
    (["bench", "resnet18", "--runtime", "tvm"], "runtime"),
    (["bench", "resnet18", "--clock", "cpu"], "clock"),
    (["bench", "resnet18", "--clock", "thread", "--threads", "2", "--input-size", "32"], "threads=1"),
    (["bench", "resnet18", "--input-size", "2"], "input"),
    (["bench", "resnet18", "--num-classes", "0"], "classes"),
    (["bench", "shufflenet_v2_x0_5"], "dependency graph"),
    (["bench", "resnet18", "--no-such-option"], "no such option"),
    (["bench", "{flat_pt}"], "input"),
]

CASES = EVOLVE + EXPORT + BENCH


def snapshot(directory: Path) -> dict:
    return {p: p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("argv, expected", CASES, ids=[" ".join(a) for a, _ in CASES])
def test_bad_invocation(argv, expected, files, tmp_path, capsys, monkeypatch):
    root, paths = files
    monkeypatch.chdir(tmp_path)  # anything written by default lands here, where we can see it
    argv = [a.format(**paths) for a in argv]
    if argv[0] == "evolve" and "--out" not in argv:
        argv += ["--out", str(tmp_path / "out")]
    before = snapshot(root)
    status = main(argv)
    captured = capsys.readouterr()
    assert status == 2, captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("kecompress: ")
    assert expected.lower() in lines[0].lower()
    assert "Traceback" not in captured.err + captured.out
    assert snapshot(root) == before  # nothing of the user's changed
    assert list(tmp_path.iterdir()) == []  # nothing half-made left behind
    assert not (tmp_path / "pwned").exists()


def test_every_subcommand_has_25_bad_invocations():
    for table in (EVOLVE, EXPORT, BENCH):
        assert len(table) >= 25
