"""benchmarks/scoreboard.py: label noise, the lottery arm's pruning, the recommendation rule, and a
run end to end that writes the JSON the issue names and keeps its jobs for a rerun."""

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import kecompress
from conftest import load_benchmark, run_benchmark
from kecompress.data import class_labels, demo_datasets

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "scoreboard.py"


@pytest.fixture(scope="module")
def board():
    return load_benchmark("scoreboard")


def test_label_noise_makes_exactly_the_fraction_wrong_the_same_way_for_a_seed(board):
    train, _, _ = demo_datasets(seed=0)
    truth = class_labels(train)
    noisy = board.NoisyLabels(train, 0.2, 10, seed=3)
    wrong = [index for index, (a, b) in enumerate(zip(noisy.labels, truth)) if a != b]
    assert len(wrong) == round(0.2 * len(truth)) and all(0 <= label < 10 for label in noisy.labels)
    assert noisy.labels == board.NoisyLabels(train, 0.2, 10, seed=3).labels
    assert noisy.labels != board.NoisyLabels(train, 0.2, 10, seed=4).labels
    image, label = noisy[wrong[0]]
    assert torch.equal(image, train[wrong[0]][0]) and label == noisy.labels[wrong[0]]


def test_magnitude_rewind_prunes_the_smallest_weights_geometrically_and_rewinds_the_rest(board):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    split = kecompress.split(model, "wels", 0.5)
    strategy = board.MagnitudeRewind(final_fraction=0.25, generations=3)
    strategy.rewind = {key: value.clone() for key, value in model.state_dict().items()}
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param))  # "training" moved the weights on
    trained = {name: param.detach().clone() for name, param in model.named_parameters()}
    strategy.forget_(model, split)
    covered = [name for name, _ in model.named_parameters() if name in split.masks]
    total = sum(trained[name].numel() for name in covered)
    first = {name: mask.clone() for name, mask in strategy.masks.items()}
    assert sum(int(mask.sum()) for mask in first.values()) == round(0.5 * total)  # 0.25 ** (1/2) kept after round 1
    smallest_kept = min(trained[name].abs()[first[name]].min() for name in covered)
    largest_pruned = max(trained[name].abs()[~first[name]].max() for name in covered)
    assert smallest_kept > largest_pruned  # global magnitude order
    for name in covered:  # the kept weights are back at the rewind point, the pruned ones zero
        assert torch.equal(model.get_parameter(name)[first[name]], strategy.rewind[name][first[name]])
        assert not model.get_parameter(name)[~first[name]].any()
    strategy.forget_(model, split)
    assert sum(int(mask.sum()) for mask in strategy.masks.values()) == round(0.25 * total)
    assert all(not (strategy.masks[name] & ~first[name]).any() for name in covered)  # pruned stays pruned


def row(fit, macs, seed=0):
    return {"seed": seed, "dense_accuracy": None, "fit_accuracy": fit, "train_macs": macs, "seconds": 1.0}


def test_the_recommendation_is_the_cheapest_arm_not_worse_than_the_best(board):
    results = {"arms": {
        "best": {"per_seed": [row(0.90, 10), row(0.80, 10, 1), row(0.85, 10, 2)]},
        "tied-cheaper": {"per_seed": [row(0.89, 5), row(0.81, 5, 1), row(0.84, 5, 2)]},
        "worse-cheapest": {"per_seed": [row(0.70, 1), row(0.60, 1, 1), row(0.65, 1, 2)]}}}
    assert board.recommend(results) == "tied-cheaper"


def test_a_spread_out_arm_that_a_cheaper_arm_beats_on_mean_is_not_recommended(board):
    # Measured so on the noisy digits: KE's fit tied the best arm only through its spread, while
    # the cheaper small-scratch arm had the higher mean but lost to the best beyond two standard errors.
    results = {"arms": {
        "best": {"per_seed": [row(0.83, 10), row(0.84, 10, 1), row(0.82, 10, 2)]},
        "cheaper-worse": {"per_seed": [row(0.79, 1), row(0.80, 1, 1), row(0.78, 1, 2)]},
        "spread": {"per_seed": [row(0.90, 5), row(0.60, 5, 1), row(0.80, 5, 2)]}}}
    assert board.recommend(results) == "best"


def test_a_run_writes_the_results_json_and_a_rerun_keeps_its_jobs(tmp_path):
    command = [sys.executable, str(SCRIPT), "--arms", "ke,long,small-kd", "--generations", "2", "--epochs", "1", "--seeds", "2", "--per-class", "3",
            "--image-size", "8", "--workers", "1", "--work-dir", str(tmp_path / "work"),
            "--out-dir", str(tmp_path / "docs"), "--json", str(tmp_path / "results.json")]
    result = run_benchmark(command)
    assert result.returncode == 0, result.stderr[-2000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert list(results["arms"]) == ["ke", "long", "small-kd"] and results["recommended"] in results["arms"]
    for arm, entry in results["arms"].items():
        assert [row["seed"] for row in entry["per_seed"]] == [0, 1]
        for row_ in entry["per_seed"]:
            assert set(row_) == {"seed", "dense_accuracy", "fit_accuracy", "train_macs", "seconds"}
            assert 0 <= row_["fit_accuracy"] <= 1 and row_["train_macs"] > 0
            assert (row_["dense_accuracy"] is None) == (arm == "small-kd")
    long, kd = ([row_["train_macs"] for row_ in results["arms"][arm]["per_seed"]] for arm in ("long", "small-kd"))
    assert all(student > teacher for student, teacher in zip(kd, long))  # the teacher's training is counted
    report = (tmp_path / "docs" / "results.md").read_text()
    assert "## digits" in report and "| small-kd | - |" in report and "## Not measured yet" in report
    assert (tmp_path / "docs" / "scoreboard" / "digits.png").stat().st_size > 0
    again = run_benchmark(command)
    assert again.returncode == 0 and again.stdout.count("kept from") == 6
    assert json.loads((tmp_path / "results.json").read_text()) == results
