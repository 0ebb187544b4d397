"""benchmarks/ke_accuracy.py: its verdicts say what the numbers say, and it runs end to end."""

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import load_benchmark, run_benchmark

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "ke_accuracy.py"


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("ke_accuracy")


def jobs_with(ke_dense, ke_fit, long, small):
    """Jobs of two seeds: KE's per-generation accuracies, the baselines' final ones. The fit as
    cut out is 3 points below the fit network."""
    jobs = {}
    for seed in (0, 1):
        jobs["ke", seed] = {"history": [{"dense_accuracy": d[seed], "fit_accuracy": f[seed],
                                         "fit_as_cut_accuracy": f[seed] - 0.03, "agreement": 0.5 + g / 4,
                                         "reset_bn_scale": 1 - 0.6 * g} for g, (d, f) in enumerate(zip(ke_dense, ke_fit))]}
        jobs["long", seed] = {"history": [{"dense_accuracy": long[seed], "fit_accuracy": 0.4,
                                           "fit_as_cut_accuracy": 0.1, "agreement": 0.2, "reset_bn_scale": 0.9}]}
        jobs["small", seed] = {"history": [{"dense_accuracy": small[seed], "fit_accuracy": small[seed]}]}
    return jobs


def test_a_ke_run_that_loses_to_the_equal_compute_baseline_says_so(bench):
    summary = bench.summarise(jobs_with(ke_dense=[(0.70, 0.72), (0.90, 0.92)], ke_fit=[(0.2, 0.3), (0.85, 0.86)],
                                        long=(0.95, 0.97), small=(0.93, 0.93)), [0, 1], generations=2)
    lines = bench.verdicts(summary, generations=2)
    assert "above N1's (71.00%): **met**" in lines[0]
    assert "(85.50%) is 5.50 points below the dense network: **missed**" in lines[1]
    assert "(KE's paper's measure), it (82.50%) is 8.50 points below the dense network: **missed**" in lines[2]
    assert lines[3].startswith("**KE's dense network loses to the equal-compute baseline**: one network trained")
    assert "96.00%, 5.00 points above it" in lines[3]
    assert lines[4].startswith("**The fit network loses to the fit-sized network")
    assert dict(bench.differences(summary))["KE dense (last generation) - N1"] == pytest.approx([0.2, 0.2])
    assert "equal-compute network reaches 40.00% (as cut out: 10.00%)" in lines[5]
    assert "same class on 75.00% of the test images at generation 2 (one network trained as long" in lines[6]
    assert "slice of it: 20.00%)" in lines[6]
    assert "fell to 0.40 of the fit channels' (generation 1: 1.00): the dense network turns down" in lines[6]


def test_a_ke_run_that_wins_says_so_and_judges_the_spread(bench):
    summary = bench.summarise(jobs_with(ke_dense=[(0.70, 0.80), (0.90, 0.96)], ke_fit=[(0.2, 0.3), (0.895, 0.955)],
                                        long=(0.88, 0.96), small=(0.80, 0.82)), [0, 1], generations=2)
    lines = bench.verdicts(summary, generations=2)
    assert "0.50 points below the dense network: **met** (within one point)" in lines[1]
    assert "3.50 points below the dense network: **missed**" in lines[2]
    assert lines[3].startswith("KE's dense network beats the equal-compute baseline (92.00%) by 1.00 points")
    assert "within two standard errors" in lines[3]
    assert "beats the fit-sized network" in lines[4] and "beyond two standard errors" in lines[4]
    assert bench.points([0.9, 0.96]) == "93.00 ± 4.24"


def test_the_reset_channels_are_not_said_to_be_muted_when_their_scale_holds(bench):
    jobs = jobs_with(ke_dense=[(0.7, 0.7), (0.9, 0.9)], ke_fit=[(0.2, 0.2), (0.9, 0.9)], long=(0.9, 0.9),
                     small=(0.9, 0.9))
    for seed in (0, 1):
        jobs["ke", seed]["history"][1]["reset_bn_scale"] = 0.95
    line = bench.verdicts(bench.summarise(jobs, [0, 1], generations=2), generations=2)[6]
    assert "Not by muting the reset channels: their BatchNorm scales are still 0.95" in line


def test_the_benchmark_runs_end_to_end_and_writes_its_report(tmp_path):
    command = [sys.executable, str(SCRIPT), "--generations", "2", "--epochs", "1", "--per-class", "3", "--seeds", "2",
               "--image-size", "8", "--batch-size", "64", "--workers", "1", "--work-dir", str(tmp_path / "work"),
               "--out-dir", str(tmp_path / "docs")]
    result = run_benchmark(command)
    assert result.returncode == 0, result.stderr[-2000:]
    report = (tmp_path / "docs" / "generations.md").read_text()
    assert "30 in all" in report and "| 2 | 2 |" in report and "Reproduce: `python benchmarks/ke_accuracy.py" in report
    assert "## Verdict" in report and (tmp_path / "docs" / "generations.png").stat().st_size > 10_000
    assert len(list((tmp_path / "work").glob("*-seed*-*.json"))) == 6
    again = run_benchmark(command)  # keeps every finished job
    assert again.returncode == 0 and again.stdout.count("kept from") == 6


@pytest.mark.parametrize("argv, message", [
    (["--per-class", "500"], "fewer than the 500 per class"),
    (["--rate", "1.5"], "split rate must be in (0, 1]"),
    (["--lr", "-1"], "learning rate must be a positive number"),
])
def test_the_benchmark_refuses_bad_settings_in_one_line(tmp_path, argv, message):
    result = subprocess.run([sys.executable, str(SCRIPT), *argv, "--work-dir", str(tmp_path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and message in result.stderr
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1
