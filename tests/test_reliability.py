"""Runs that survive: killed and resumed, interrupted, out of disk, handed malicious files."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from kecompress import KecompressError
from kecompress.cli import main

# A kill at a moment of the test's choosing: the child process patches one function so that it
# SIGKILLs itself there, then runs the real command.
KILLER = r"""
import os, signal, sys
import torch
import kecompress.files
import kecompress.rundir
from kecompress.cli import main
torch.set_num_threads(1)  # as in the test process: float sums depend on the thread count
where, count = sys.argv[1], int(sys.argv[2])
calls = {"n": 0}
def kill_on_call(original, matches=lambda *a: True):
    def wrapper(*args, **kwargs):
        if matches(*args):
            calls["n"] += 1
            if calls["n"] == count:
                os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)
    return wrapper
if where == "step":          # mid-epoch: inside the optimizer step
    torch.optim.SGD.step = kill_on_call(torch.optim.SGD.step)
elif where == "generation":  # between generations: right after metrics.json is written
    original = kecompress.rundir.save_json
    def save_then_die(obj, path):
        original(obj, path)
        if len(obj.get("generations", ())) == count:
            os.kill(os.getpid(), signal.SIGKILL)
    kecompress.rundir.save_json = save_then_die
elif where == "checkpoint":  # during a checkpoint write: the temporary file is written, not renamed
    kecompress.files.os.replace = kill_on_call(os.replace, lambda src, dst: str(dst).endswith("checkpoint.pt"))
sys.exit(main(sys.argv[3:]))
"""


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "tiny.pt"
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2), nn.Linear(32, 10))
    torch.save(model, path)
    return path


def evolve_args(model_file, out):
    return ["evolve", str(model_file), "--image-size", "12", "--generations", "3", "--epochs", "2",
            "--batch-size", "128", "--lr", "0.05", "--seed", "3", "--out", str(out)]


def outcome(run_dir: Path):
    metrics = json.loads((run_dir / "metrics.json").read_text())["generations"]
    for record in metrics:
        record.pop("seconds")
    weights = torch.load(run_dir / "dense.pt", weights_only=True)
    fit = torch.load(run_dir / "fit.pt", weights_only=True)["state_dict"]
    return metrics, weights, fit


def assert_same(a, b):
    assert a[0] == b[0]
    for left, right in zip(a[1:], b[1:]):
        assert left.keys() == right.keys()
        assert all(torch.equal(left[k], right[k]) for k in left)


@pytest.fixture(scope="module")
def reference_run(model_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "run"
    assert main(evolve_args(model_file, out)) == 0
    return out


@pytest.fixture(scope="module")
def reference(reference_run):
    return outcome(reference_run)


def test_the_same_command_twice_gives_the_same_run(model_file, reference, tmp_path):
    assert main(evolve_args(model_file, tmp_path / "again")) == 0
    assert_same(outcome(tmp_path / "again"), reference)
    split = torch.load(tmp_path / "again" / "split.pt", weights_only=True)
    assert split["method"] == "kels" and split["rate"] == 0.5


@pytest.mark.parametrize("where, count", [("step", 3), ("step", 14), ("generation", 1), ("checkpoint", 2)])
def test_a_killed_run_resumes_to_the_same_result(where, count, model_file, reference, tmp_path):
    out = tmp_path / "run"
    killed = subprocess.run([sys.executable, "-c", KILLER, where, str(count), *evolve_args(model_file, out)],
                            capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (out / "dense.pt").exists()
    assert main(evolve_args(model_file, out) + ["--resume"]) == 0
    assert_same(outcome(out), reference)
    assert not list(out.glob(".*.tmp"))  # no temporary file left behind after the resume finishes


def test_a_full_disk_during_a_checkpoint_fails_clearly_and_keeps_the_previous_one(
        model_file, tmp_path, monkeypatch, capsys):
    import kecompress.files
    out = tmp_path / "run"
    real_save, saves = torch.save, {"n": 0}

    def full_disk_on_third_checkpoint(obj, path, *args, **kwargs):
        if ".checkpoint.pt." in str(path):
            saves["n"] += 1
            if saves["n"] == 3:
                with open(path, "wb") as partial:
                    partial.write(b"PK\x03\x04 half a checkpoint")
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(kecompress.files.torch, "save", full_disk_on_third_checkpoint)
    assert main(evolve_args(model_file, out)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "No space left on device" in err and "--resume" in err
    kept = torch.load(out / "checkpoint.pt", weights_only=True)  # the second checkpoint, intact
    assert (kept["generation"], kept["epochs_done"]) == (1, 2)  # the end of generation 1
    assert not list(out.glob(".*.tmp"))


class RunsACommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("victim", ["checkpoint.pt", "split.pt", "dense.pt", "fit.pt"])
def test_a_malicious_file_in_a_run_directory_runs_no_code(victim, model_file, reference_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(reference_run, out)
    marker = tmp_path / "pwned"
    torch.save({"model": RunsACommand(marker)}, out / victim)
    if victim == "checkpoint.pt":
        status = main(evolve_args(model_file, out) + ["--resume"])
        message = capsys.readouterr().err
    else:
        from kecompress.rundir import load_fit, load_run
        with pytest.raises(KecompressError) as refusal:
            load_run(out) if victim != "fit.pt" else load_fit(out / victim, dense=nn.Identity())
        status, message = 2, str(refusal.value)
    assert status == 2
    assert victim in message
    assert not marker.exists()
