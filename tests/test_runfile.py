"""`kecompress evolve --config FILE` and `--print-config`: a run repeated from a file."""

import json
from dataclasses import asdict

import pytest
import torch

from kecompress.cli import main
from kecompress.rundir import RunDirectory, load_fit, load_run

# Tiny, but every kind of setting off its default: the split, the forgetting, the loss, the data order.
SETTINGS = ["--rate", "0.25", "--generations", "2", "--epochs", "1", "--batch-size", "64", "--seed", "3",
            "--forget", "shrink-perturb", "--shrink", "0.5", "--label-smoothing", "0.05"]


def run(capsys, *argv):
    status = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def print_config(capsys, *argv) -> str:
    status, stdout, err = run(capsys, "evolve", *argv, "--print-config")
    assert status == 0, err
    return stdout


def test_a_run_repeated_from_its_config_json_ends_bit_exact(tmp_path, capsys):
    original, again = tmp_path / "original", tmp_path / "again"
    assert run(capsys, "evolve", "mobilenet_v3_small", *SETTINGS, "--out", original)[0] == 0
    status, _, err = run(capsys, "evolve", "--config", original / "config.json", "--out", again)
    assert status == 0, err
    assert (again / "config.json").read_text() == (original / "config.json").read_text()
    records = [[{**asdict(record), "seconds": None} for record in RunDirectory(run_dir).read_metrics()]
               for run_dir in (original, again)]
    assert records[0] == records[1]
    for name in ("dense", "fit"):
        models = [load_run(run_dir)[0] if name == "dense" else load_fit(RunDirectory(run_dir).fit_file)
                  for run_dir in (original, again)]
        states = [model.state_dict() for model in models]
        assert all(torch.equal(states[0][key], states[1][key]) for key in states[0])


def test_command_line_options_override_the_file(tmp_path, capsys):
    path = tmp_path / "run.toml"
    path.write_text('model = "resnet18"\nrate = 0.25\nsplit = "wels"\n[forget]\nname = "llf"\nstart = "layer4"\n'
                    "[training]\nepochs = 3\nlr = 0.05\n")
    written = print_config(capsys, "--config", path, "--rate", "0.5", "--forget", "ke", "--epochs", "4")
    assert 'rate = 0.5\n' in written and 'split = "wels"\n' in written
    assert 'epochs = 4\n' in written and 'lr = 0.05\n' in written
    assert '[forget]\nname = "ke"\n\n' in written  # llf's start went with llf
    assert 'model = "mobilenet_v3_small"' in print_config(capsys, "mobilenet_v3_small", "--config", path)
    # A run's classes are its data's: other data on the command line has its own.
    path.write_text('model = "resnet18"\nnum_classes = 10\n')
    assert "num_classes = 10\n" in print_config(capsys, "--config", path)
    assert "num_classes" not in print_config(capsys, "--config", path, "--data", tmp_path)


@pytest.mark.parametrize("suffix", [".toml", ".json"])
def test_print_config_round_trips(tmp_path, capsys, suffix):
    options = ["resnet18", "--align", "8", "--distill-fit", "--distill-ramp", "2", "--finetune-fit", "3",
               "--target-accuracy", "0.9", "--fit-batchnorm", "inherited", "--data", tmp_path, "--augment", "pad-crop"]
    path = tmp_path / f"run{suffix}"
    status, stdout, err = run(capsys, "evolve", *options, "--print-config", path)
    assert status == 0 and str(path) in stdout, err
    text = path.read_text()
    assert (json.loads(text)["distill_fit"]["ramp_epochs"] if suffix == ".json" else "ramp_epochs = 2" in text)
    assert print_config(capsys, "--config", path) == print_config(capsys, *options)
    assert "distill_fit" not in print_config(capsys, "--config", path, "--no-distill-fit")
    # The file the user asked for is never overwritten.
    status, _, err = run(capsys, "evolve", *options, "--print-config", path)
    assert status == 2 and "exists" in err and path.read_text() == text


@pytest.mark.parametrize("text, message", [
    ("rtae = 0.5\n", "unknown setting 'rtae'"),
    ("[training]\nepoch = 3\n", "unknown setting 'training.epoch'"),
    ("rate = 2.0\n", "the value of --rate, 2.0"),
    ('split = "pruned"\n', "the value of --split, 'pruned'"),
    ("rate = \n", "is not valid TOML"),
    ("[training]\nmomentum = 0.5\n", "training.momentum = 0.5, which the command line cannot set"),
    ('loaders = "python"\n', "made from Python with data loaders of its own"),
])
def test_a_bad_file_is_one_line_and_status_2(tmp_path, capsys, text, message):
    path = tmp_path / "run.toml"
    path.write_text(text)
    status, stdout, err = run(capsys, "evolve", "resnet18", "--config", path)
    assert status == 2 and stdout == ""
    assert message in err and str(path) in err and err.count("\n") == 1


def test_a_missing_or_non_object_file_is_refused(tmp_path, capsys):
    status, _, err = run(capsys, "evolve", "resnet18", "--config", tmp_path / "absent.json")
    assert status == 2 and "no such file" in err and err.count("\n") == 1
    (tmp_path / "list.json").write_text("[1, 2]")
    status, _, err = run(capsys, "evolve", "resnet18", "--config", tmp_path / "list.json")
    assert status == 2 and "holds a list, not settings" in err
