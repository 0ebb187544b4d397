"""Benchmark: fault injection at scale. A run is killed with SIGKILL at random moments, its files are
damaged at random, and it is resumed every time; every resume must end bit for bit where an
uninterrupted run ends, and every damaged file must be named.

First one uninterrupted run (``kecompress evolve`` of a tiny convolutional network on the bundled
digits, in a child process forked from this one, so that each run skips importing torch) gives
the reference result and wall time. Then, for
each of ``--faults`` faults, in a fresh run directory:

1. the same command is started and killed with SIGKILL at a moment drawn uniformly over the time
   the reference's run directory existed (from its first file to the run's end: training, a
   checkpoint or manifest write, the final files, wherever it falls; a kill before that, while
   the data load, leaves nothing to damage or resume). A run that ends before its kill (the
   machine's load varies) is not a fault: it is drawn again, and the shortest run seen so far
   bounds the next moments;
2. with probability ``--damage``, one file of the directory, drawn at random, has 64 bytes flipped
   or is cut to half its size (the chart, which nothing reads back, is left out);
3. the command is run again with ``--resume`` (without it when the kill came before the run wrote
   its configuration, as the refusal tells the user), to its end.

Reported, from this run only: the resumes that ended bit-exact (metrics but their wall times,
dense weights and fit network equal to the reference's); the damaged files that the resume named
(in a note or in its one-line error); the resumes refused, with their line; and the wall time lost
per fault: the killed run's time plus the resume's, less the reference's. This is a benchmark, not
a test: it exits 0 whatever it measures.

Usage:
    .venv/bin/python benchmarks/fault_injection.py [--faults 50] [--damage 0.5] [--seed 0]
        [--generations 2] [--epochs 2] [--workdir DIR] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import machine, machine_line, run_script  # noqa: E402

UNREAD = {"generations.png"}  # redrawn by `kecompress report`, read by nothing: not in the manifest


def tiny_model(path: Path) -> None:
    """The network the runs train, saved whole (the tests' tiny network)."""
    import torch
    import torch.nn as nn

    torch.manual_seed(0)
    torch.save(nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2), nn.Linear(32, 10)), path)


def evolve_command(model: Path, out: Path, args: argparse.Namespace) -> list[str]:
    return ["evolve", str(model), "--image-size", "12", "--generations",
            str(args.generations), "--epochs", str(args.epochs), "--batch-size", "128", "--lr", "0.05",
            "--seed", "3", "--out", str(out)]


def start(argv: list[str], stderr: Path) -> int:
    """Fork a child that runs ``kecompress ARGV`` (stdout discarded, stderr to a file); its pid."""
    pid = os.fork()
    if pid == 0:  # the child: the command line's main, then out at once, whatever happens
        status = 1
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
            os.dup2(os.open(stderr, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
            from kecompress.cli import main as kecompress

            status = kecompress(argv)
        finally:
            os._exit(status)
    return pid


def wait(pid: int, seconds: float | None = None) -> int | None:
    """The exit status of child ``pid``, or None when it is still running after ``seconds``."""
    deadline = None if seconds is None else time.perf_counter() + seconds
    while True:
        done, status = os.waitpid(pid, os.WNOHANG if deadline is not None else 0)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.perf_counter() >= deadline:
            return None
        time.sleep(0.005)


def run_to_end(argv: list[str], stderr: Path, first_file: Path | None = None) -> tuple[int, str, float, float]:
    """Exit status, stderr and wall seconds of ``kecompress ARGV`` run to its end, and the second
    ``first_file`` appeared (0 when not watched)."""
    started, appeared = time.perf_counter(), 0.0
    pid = start(argv, stderr)
    while (status := wait(pid, 0.01)) is None:
        if first_file is not None and not appeared and first_file.exists():
            appeared = time.perf_counter() - started
    return status, stderr.read_text(), time.perf_counter() - started, appeared


def run_and_kill(argv: list[str], after: float, stderr: Path) -> tuple[bool, float]:
    """Start ``kecompress ARGV`` and SIGKILL it ``after`` seconds in: (whether it was still running, wall seconds)."""
    started = time.perf_counter()
    pid = start(argv, stderr)
    if wait(pid, after) is not None:
        return False, time.perf_counter() - started
    os.kill(pid, signal.SIGKILL)
    wait(pid)
    return True, time.perf_counter() - started


def outcome(run_dir: Path):
    """What an uninterrupted run and a resumed one must share: records (but wall time), weights."""
    import torch

    records = json.loads((run_dir / "metrics.json").read_text())["generations"]
    for record in records:
        record.pop("seconds")
    return records, torch.load(run_dir / "dense.pt", weights_only=True), \
        torch.load(run_dir / "fit.pt", weights_only=True)["state_dict"]


def same(a, b) -> bool:
    import torch

    return a[0] == b[0] and all(left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)
                                for left, right in zip(a[1:], b[1:]))


def damage(run_dir: Path, rng: random.Random) -> tuple[str, str] | None:
    """Flip 64 bytes of, or cut to half, a file of ``run_dir`` drawn at random: (its name, how)."""
    candidates = sorted(path for path in run_dir.iterdir() if path.is_file() and not path.name.startswith(".")
                        and path.name not in UNREAD and path.stat().st_size > 0)
    if not candidates:
        return None
    victim = rng.choice(candidates)
    data = bytearray(victim.read_bytes())
    if rng.random() < 0.5:
        start = rng.randrange(max(1, len(data) - 64))
        data[start:start + 64] = bytes(byte ^ 0xFF for byte in data[start:start + 64])
        how = "64 bytes flipped"
    else:
        data = data[:len(data) // 2]
        how = "cut to half"
    victim.write_bytes(bytes(data))
    return victim.name, how


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--faults", type=int, default=50, help="kills (each followed by a resume)")
    parser.add_argument("--damage", type=float, default=0.5, help="probability a kill is followed by a damaged file")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments and the damage")
    parser.add_argument("--generations", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=None, help="where the runs go [default: a temporary directory]")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="kecompress-faults-"))
    workdir.mkdir(parents=True, exist_ok=True)
    model, stderr = workdir / "tiny.pt", workdir / "stderr.txt"
    tiny_model(model)
    import torch

    torch.set_num_threads(1)  # every run alike (float sums depend on the thread count); forked children keep it
    import kecompress.cli  # noqa: F401  (imported once, here: each forked run starts at once)
    print(machine_line(machine()), f"load average {os.getloadavg()[0]:.2f}")

    status, err, reference_seconds, directory_from = run_to_end(evolve_command(model, workdir / "reference", args),
                                                                stderr, workdir / "reference" / "split.pt")
    if status != 0:
        print(f"the uninterrupted run failed: {err.strip()}", file=sys.stderr)
        return 1
    reference = outcome(workdir / "reference")
    print(f"uninterrupted run: {reference_seconds:.1f} s ({args.generations} generations of {args.epochs} epochs), "
          f"its run directory written from {directory_from:.1f} s on")

    faults, shortest = [], reference_seconds
    for index in range(2 * args.faults):  # a run that ends before its kill is drawn again
        if sum(fault["killed"] for fault in faults) == args.faults:
            break
        out = workdir / f"fault-{index:03d}"
        command = evolve_command(model, out, args)
        after = rng.uniform(directory_from, max(directory_from, shortest))
        killed, killed_seconds = run_and_kill(command, after, stderr)
        if not killed:
            shortest = min(shortest, killed_seconds)
        damaged = damage(out, rng) if killed and out.is_dir() and rng.random() < args.damage else None
        again = command + (["--resume"] if (out / "config.json").is_file() else [])
        status, err, resume_seconds, _ = run_to_end(again, stderr)
        fault = {"kill_after_s": round(after, 2), "killed": killed, "damaged": damaged, "resumed": "--resume" in again,
                 "status": status, "lost_s": round(killed_seconds + resume_seconds - reference_seconds, 2),
                 "bit_exact": status == 0 and same(outcome(out), reference),
                 "named": damaged is not None and str(out / damaged[0]) in err,
                 "lines": [line for line in err.strip().splitlines() if line.startswith("kecompress:")]}
        faults.append(fault)
        print(f"{index + 1:3d}: killed at {after:5.2f} s{'' if killed else ' (had ended)'}; "
              f"{'damaged ' + ' '.join(damaged) if damaged else 'no damage'}; "
              f"{'bit-exact' if fault['bit_exact'] else 'NOT bit-exact (status %d)' % status}"
              + (f"; named: {fault['named']}" if damaged else "") + f"; lost {fault['lost_s']:.1f} s", flush=True)
        for line in fault["lines"]:
            print(f"       {line[:160]}")
        shutil.rmtree(out, ignore_errors=True)

    killed = [fault for fault in faults if fault["killed"]]
    damaged = [fault for fault in killed if fault["damaged"]]
    refused = [fault for fault in killed if fault["status"] != 0]
    lost = [fault["lost_s"] for fault in killed]
    summary = {"faults": len(faults), "killed": len(killed),
               "bit_exact": sum(fault["bit_exact"] for fault in killed), "refused": len(refused),
               "damaged": len(damaged), "damaged_named": sum(fault["named"] for fault in damaged),
               "reference_s": round(reference_seconds, 2), "directory_from_s": round(directory_from, 2),
               "lost_s_mean": round(statistics.mean(lost), 2) if lost else None,
               "lost_s_median": round(statistics.median(lost), 2) if lost else None,
               "lost_s_max": round(max(lost), 2) if lost else None}
    print(f"\n{summary['killed']} of {summary['faults']} kills landed while the run was running; "
          f"{summary['bit_exact']} of {summary['killed']} resumes ended bit-exact, {summary['refused']} refused; "
          f"{summary['damaged_named']} of {summary['damaged']} damaged files named by the resume; wall time lost per "
          f"fault: mean {summary['lost_s_mean']} s, median {summary['lost_s_median']} s, max {summary['lost_s_max']} s "
          f"(uninterrupted run {summary['reference_s']} s)")
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "faults": faults, "machine": machine()}, indent=2) + "\n")
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_script("fault_injection", main))
