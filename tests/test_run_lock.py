"""One writer per run directory: a second writer is refused naming the holder, a killed holder's
lock is taken over, and readers need no lock."""

import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from kecompress import runlock
from kecompress.cli import main

LANDED = Path(__file__).parent / "data" / "landed"
ROOT = Path(__file__).parent.parent
EVOLVE = ["evolve", str(LANDED / "tiny.pt"), "--image-size", "12", "--generations", "2", "--epochs", "2",
          "--batch-size", "256", "--lr", "0.05", "--seed", "3"]
HOLDER = "import sys, time; from kecompress import runlock; runlock.acquire(sys.argv[1]); print('held', flush=True); " \
         "time.sleep(300)"


def child_env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def started_together(tmp_path_factory):
    """Two `kecompress evolve` of one --out started at the same moment: (run directory, both results)."""
    out = tmp_path_factory.mktemp("together") / "run"
    command = [sys.executable, "-m", "kecompress", *EVOLVE, "--out", str(out)]
    runs = [subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=child_env())
            for _ in range(2)]
    return out, [(run.wait(), run.stderr.read()) for run in runs]


def test_two_runs_started_together_on_one_directory_one_is_refused(started_together):
    out, results = started_together
    statuses = sorted(status for status, _ in results)
    assert statuses == [0, 2], results
    refused = next(err for status, err in results if status == 2).strip().splitlines()
    assert len(refused) == 1, refused
    # Refused by the lock while the other writes, or by the finished run it found.
    assert "being written by another kecompress run (pid" in refused[0] or "holds a kecompress run" in refused[0]
    assert "Traceback" not in refused[0]
    assert not (out / runlock.LOCK_FILE).exists()  # the winner let go at its end


def test_a_second_writer_is_refused_naming_the_holder_readers_are_not_and_a_killed_holder_is_taken_over(
        started_together, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(started_together[0], out)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True,
                              env=child_env())
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main([*EVOLVE, "--out", str(out), "--resume"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"pid {holder.pid} on host {socket.gethostname()}" in err[0], err
        assert "wait for it to end, or choose another --out" in err[0]
        # Readers take no lock: they read the files as they are, each whole and checked.
        assert main(["report", str(out)]) == 0
        assert main(["info", str(out)]) == 0
        assert main(["export", str(out), "--onnx", "--out", str(tmp_path / "onnx")]) == 0
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (out / runlock.LOCK_FILE).exists()  # left behind by the killed holder; the kernel dropped its lock
    capsys.readouterr()
    assert main([*EVOLVE, "--out", str(out), "--resume"]) == 0
    assert not (out / runlock.LOCK_FILE).exists()


def test_the_lock_is_held_once_per_process_and_released_with_its_file(tmp_path):
    runlock.acquire(tmp_path)
    runlock.acquire(tmp_path)  # a run that locks in build, then again at its start: no error
    assert runlock.holder(tmp_path)["pid"] == os.getpid()
    runlock.release(tmp_path)
    assert runlock.holder(tmp_path) is None and list(tmp_path.iterdir()) == []
