"""A pretrained start: --weights loads a state dict into the architecture before the split."""

import re
import pytest
import torch
import torch.nn as nn
import torchvision

from kecompress import KecompressError
from kecompress.cli import main
from kecompress.rundir import RunDirectory
from kecompress.weights import WeightsNote, load_weights


def test_a_state_dict_of_another_classifier_size_starts_the_run_with_the_classifier_re_initialised(tmp_path, capsys):
    pretrained = torchvision.models.resnet18(num_classes=1000)
    torch.save({"epoch": 90, "state_dict": pretrained.state_dict()}, tmp_path / "checkpoint.pth")  # a training script's
    out = tmp_path / "run"
    status = main(["evolve", "resnet18", "--weights", str(tmp_path / "checkpoint.pth"), "--generations", "1",
                   "--epochs", "1", "--image-size", "16", "--batch-size", "256", "--lr", "0.001", "--out", str(out)])
    printed = capsys.readouterr()
    assert status == 0, printed.err
    assert "note: the classifier fc has 10 outputs, the weights 1000: it starts re-initialised" in " ".join(
        printed.out.split())
    assert RunDirectory(out).read_config().weights == str((tmp_path / "checkpoint.pth").resolve())
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)["model"]
    # One epoch at lr 0.001 moved the first convolution only a little from the pretrained one.
    assert (checkpoint["conv1.weight"] - pretrained.conv1.weight).abs().max() < 0.05


def test_weights_that_fit_load_exactly_and_names_saved_by_ddp_or_compile_are_understood(tmp_path):
    source = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
    source(torch.zeros(1, 3, 5, 5))
    torch.save({f"module.{key}": value for key, value in source.state_dict().items()}, tmp_path / "w.pt")
    target = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(36, 2))
    load_weights(target, tmp_path / "w.pt")
    assert all(torch.equal(value, source.state_dict()[key]) for key, value in target.state_dict().items())


@pytest.mark.parametrize("weights, message", [
    (lambda: {key: value for key, value in nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 2))
              .state_dict().items() if key != "0.bias"}, "1 missing (0.bias)"),
    (lambda: {**nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 2)).state_dict(),
              "head.weight": torch.zeros(1)}, "1 unexpected (head.weight)"),
    (lambda: nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Linear(4, 2)).state_dict(), "of another shape"),
    (lambda: [1, 2, 3], "holds no state dict"),
])
def test_weights_that_do_not_fit_are_refused_naming_the_keys(weights, message, tmp_path):
    torch.save(weights(), tmp_path / "w.pt")
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 2))
    with pytest.raises(KecompressError, match=re.escape(message)):
        load_weights(model, tmp_path / "w.pt")


class RunsACommand:
    def __reduce__(self):
        import os
        return (os.system, ("touch pwned",))


def test_weights_are_read_without_running_code_and_bad_files_get_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"state_dict": RunsACommand()}, tmp_path / "evil.pt")
    for path, message in ((tmp_path / "evil.pt", "cannot read weights"), (tmp_path / "missing.pt", "does not exist")):
        status = main(["evolve", "resnet18", "--weights", str(path), "--out", str(tmp_path / "run")])
        err = capsys.readouterr().err
        assert status == 2 and message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "pwned").exists()


def test_the_note_is_a_warning_from_python(tmp_path):
    model = nn.Sequential(nn.Linear(4, 3))
    path = tmp_path / "w.pt"
    with pytest.warns(WeightsNote, match="re-initialised"):
        torch.save(nn.Sequential(nn.Linear(4, 5)).state_dict(), path)
        load_weights(model, path)
