import os
import uuid

import pytest
import torch
import torch.nn as nn

from kecompress.models import build_model, load_model_file, output_features, resolve_model

from conftest import error


class RunsCommandOnLoad:
    """What a hostile model file holds: unpickling it runs a shell command."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


class TinyCustomNet(nn.Module):
    """A model class outside torch and torchvision: loadable only from a trusted file."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 3)

    def forward(self, x):
        return self.body(x).relu()


def test_build_model_sets_the_class_count():
    model = build_model("resnet18", num_classes=7)
    assert model.fc.out_features == 7
    assert output_features(model, torch.zeros(1, 3, 32, 32)) == 7


def test_build_googlenet_returns_plain_logits_in_training_mode():
    model = build_model("googlenet", num_classes=3).train()
    assert model(torch.zeros(2, 3, 64, 64)).shape == (2, 3)


def test_unknown_architecture_suggests_close_names():
    message = error(build_model, "resnet81", num_classes=3)
    assert "unknown architecture 'resnet81'" in message and "resnet18" in message
    assert "list_models" in message


def test_output_features_keeps_the_mode_and_reports_bad_inputs():
    model = build_model("mobilenet_v2", num_classes=4).train()
    assert output_features(model, torch.zeros(2, 3, 32, 32)) == 4 and model.training
    grey = torch.zeros(1, 1, 32, 32)
    assert "cannot run on inputs of shape (1, 32, 32)" in error(output_features, model, grey)


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2"])
def test_whole_model_round_trip_needs_no_trust(tmp_path, arch):
    model = build_model(arch, num_classes=5).eval()
    path = tmp_path / f"{arch}.pt"
    torch.save(model, path)
    loaded = load_model_file(path).eval()
    assert type(loaded) is type(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_resolve_model_picks_file_or_architecture(tmp_path):
    path = tmp_path / "net.pth"
    torch.save(build_model("resnet18", num_classes=2), path)
    assert resolve_model(str(path), None).fc.out_features == 2
    assert resolve_model("resnet18", 6).fc.out_features == 6
    assert "needs the number of classes" in error(resolve_model, "resnet18", None)
    assert "does not exist" in error(resolve_model, str(tmp_path / "absent.pt"), 3)


def test_hostile_file_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / f"pwned-{uuid.uuid4().hex}"
    path = tmp_path / "evil.pt"
    torch.save(RunsCommandOnLoad(f"touch {marker}"), path)
    message = error(load_model_file, path)
    assert "system" in message and "--trust-model-file" in message
    assert not marker.exists()


def test_custom_class_needs_trust(tmp_path):
    model = TinyCustomNet()
    path = tmp_path / "custom.pt"
    torch.save(model, path)
    message = error(load_model_file, path)
    assert "TinyCustomNet" in message and "--trust-model-file" in message
    loaded = load_model_file(path, trust_file=True)
    x = torch.randn(2, 4)
    assert isinstance(loaded, TinyCustomNet) and torch.equal(loaded(x), model(x))


def test_missing_file(tmp_path):
    assert "does not exist" in error(load_model_file, tmp_path / "absent.pt")


def test_directory(tmp_path):
    assert "is a directory" in error(load_model_file, tmp_path)


def test_empty_file(tmp_path):
    (tmp_path / "empty.pt").touch()
    assert "is empty" in error(load_model_file, tmp_path / "empty.pt")


def test_truncated_file(tmp_path):
    path = tmp_path / "cut.pt"
    torch.save(build_model("resnet18", num_classes=2), path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert "truncated or corrupt" in error(load_model_file, path)


def test_not_a_torch_file(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("these are not weights")
    assert "not a readable torch.save file" in error(load_model_file, path)


def test_state_dict_file(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(build_model("resnet18", num_classes=2).state_dict(), path)
    message = error(load_model_file, path)
    assert "holds a state_dict, not a whole model" in message and "resnet18" in message


def test_file_holding_a_list(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([torch.ones(2), 3], path)
    assert "holds a list, not an nn.Module" in error(load_model_file, path)
