"""Runs that survive: killed and resumed, interrupted, out of disk, handed malicious files."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from kecompress import KecompressError, manifest
from kecompress.cli import main
from kecompress.rundir import RunDirectory, RunNote

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
    original = kecompress.rundir.RunDirectory.write_metrics
    def save_then_die(self, records, finetune=None):
        original(self, records, finetune)
        if len(records) == count:
            os.kill(os.getpid(), signal.SIGKILL)
    kecompress.rundir.RunDirectory.write_metrics = save_then_die
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


def pages(size: int) -> int:
    return -(-size // 4096) * 4096


@pytest.fixture
def small_disk(tmp_path):
    """A real file system that fills up: a tmpfs of 2 MiB mounted for the test (needs root)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a size-limited tmpfs needs root: the variant that fails the write from inside runs")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()}): the variant that fails the write "
                    "from inside runs")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def assert_stopped_on_a_full_disk_with_nothing_lost(out: Path, capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0], err
    assert f"cannot write {out / 'checkpoint.pt'}" in err[0] and "MiB" in err[0] and "--resume" in err[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RunNote)  # the newest checkpoint whole and matching the manifest
        kept = RunDirectory(out).read_checkpoint(set_aside_damaged=True)
    assert (kept["generation"], kept["epochs_done"]) == (1, 2)  # the end of generation 1: two checkpoints kept
    assert not list(out.glob(".*.tmp"))


def test_a_full_disk_during_a_checkpoint_stops_with_one_line_and_resumes_bit_exact(
        model_file, reference, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    real_write, saves = Path.write_bytes, {"n": 0}

    def full_disk_on_third_checkpoint(path, data):
        if path.name.startswith(".checkpoint.pt."):
            saves["n"] += 1
            if saves["n"] == 3:
                real_write(path, data[:len(data) // 2])
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(path, data)

    monkeypatch.setattr(Path, "write_bytes", full_disk_on_third_checkpoint)
    assert main(evolve_args(model_file, out)) == 2
    monkeypatch.undo()  # space freed
    assert_stopped_on_a_full_disk_with_nothing_lost(out, capsys)
    assert main(evolve_args(model_file, out) + ["--resume"]) == 0
    assert_same(outcome(out), reference)


def test_a_real_full_file_system_stops_the_run_and_resumes_bit_exact_once_freed(
        model_file, reference_run, reference, small_disk, capsys):
    # Room for the run's first files and two checkpoints, not for a third beside them.
    sizes = {path.name: path.stat().st_size for path in reference_run.iterdir()}
    room = sum(pages(sizes[name]) for name in ("source_model.pt", "split.pt", "config.json", "metrics.json"))
    room += 2 * pages(sizes["manifest.json"]) + 2 * pages(sizes["checkpoint.pt"]) + 2 * 4096
    disk = os.statvfs(small_disk)
    filler = small_disk / "filler"
    filler.write_bytes(bytes(disk.f_bavail * disk.f_frsize - room))
    out = small_disk / "run"
    assert main(evolve_args(model_file, out)) == 2
    assert_stopped_on_a_full_disk_with_nothing_lost(out, capsys)
    filler.unlink()
    assert main(evolve_args(model_file, out) + ["--resume"]) == 0
    assert_same(outcome(out), reference)


def flip_bytes(path: Path, count: int = 64) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + count] = bytes(byte ^ 0xFF for byte in data[middle:middle + count])
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("victim, command", [("config.json", "report"), ("metrics.json", "report"),
                                             ("split.pt", "info"), ("source_model.pt", "export"),
                                             ("dense.pt", "export"), ("fit.pt", "export")])
def test_bytes_flipped_in_a_file_are_named_in_one_line(victim, command, reference_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(reference_run, out)
    flip_bytes(out / victim)
    status = main([command, str(out), *(["--onnx", "--out", str(tmp_path / "onnx")] if command == "export" else [])])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1, err
    assert f"{out / victim} is damaged: its SHA-256 differs" in err[0]
    assert not (tmp_path / "onnx").exists()


def test_a_damaged_manifest_is_named_and_the_files_still_read(reference_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(reference_run, out)
    flip_bytes(out / "manifest.json", count=8)
    assert main(["report", str(out)]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"note: {out / 'manifest.json'} is damaged" in err[0], err


@pytest.mark.parametrize("damage", ["64 bytes flipped", "cut to half", "cut to half, no manifest",
                                    "cut to half, the run's first checkpoint"])
def test_a_damaged_newest_checkpoint_falls_back_on_the_previous_and_ends_bit_exact(
        damage, model_file, reference_run, reference, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(reference_run, out)
    for made_again in ("dense.pt", "fit.pt", "metrics.json"):  # the resumed run must write them anew
        (out / made_again).unlink()
    newest = out / "checkpoint.pt"
    if damage == "64 bytes flipped":
        flip_bytes(newest)
    else:
        newest.write_bytes(newest.read_bytes()[:newest.stat().st_size // 2])
    if damage.endswith("no manifest"):  # a run directory of an earlier version
        (out / "manifest.json").unlink()
    before = out / "checkpoint.previous.pt"
    if damage.endswith("first checkpoint"):  # killed after its first checkpoint: nothing before it but the start
        before.unlink()
        files = manifest.read(out)
        del files["checkpoint.previous.pt"]
        (out / "manifest.json").write_bytes(manifest.encode(files))
    assert main(evolve_args(model_file, out) + ["--resume"]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if "checkpoint" in line]
    assert len(notes) == 1, notes
    assert f"note: {newest} is damaged" in notes[0]
    assert f"resuming from {'the start of the run' if damage.endswith('first checkpoint') else before}" in notes[0]
    assert (out / "checkpoint.damaged.pt").is_file()  # kept, out of the rotation
    assert_same(outcome(out), reference)


def test_a_damaged_previous_checkpoint_is_named_on_resume(model_file, reference_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(reference_run, out)
    flip_bytes(out / "checkpoint.previous.pt")
    assert main(evolve_args(model_file, out) + ["--resume"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"note: {out / 'checkpoint.previous.pt'} is damaged" in err[0], err


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
    (out / "manifest.json").unlink()  # no checksum to stop it first: weights_only alone must
    for path in [out / victim] + ([out / "checkpoint.previous.pt"] if victim == "checkpoint.pt" else []):
        torch.save({"model": RunsACommand(marker)}, path)
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


def test_files_written_once_are_made_again_on_resume_when_damaged(model_file, reference_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(reference_run, out)
    victims = ("config.json", "split.pt", "source_model.pt")
    for victim in victims:
        flip_bytes(out / victim)
    assert main(evolve_args(model_file, out) + ["--resume"]) == 0
    notes = capsys.readouterr().err.strip().splitlines()
    assert len(notes) == 3 and all(f"note: {out / victim} was damaged: made again" in note
                                   for victim, note in zip(victims, notes)), notes
    assert all((out / victim).read_bytes() == (reference_run / victim).read_bytes() for victim in victims)
