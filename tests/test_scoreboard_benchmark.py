"""benchmarks/scoreboard.py: label noise, the lottery arm's pruning, the recommendation rule, and a
run end to end that writes the JSON the issue names and keeps its jobs for a rerun."""

import json
import subprocess
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


# --- the questions: KE generation by generation, and the fit learning from the dense one ---

@pytest.fixture(scope="module")
def questions():
    return load_benchmark("questions")


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
        jobs["small-scratch", seed] = {"fit_accuracy": small[seed]}
    return jobs


def test_a_ke_run_that_loses_to_the_equal_compute_baseline_says_so(questions):
    summary = questions.summarise(jobs_with(ke_dense=[(0.70, 0.72), (0.90, 0.92)], ke_fit=[(0.2, 0.3), (0.85, 0.86)],
                                            long=(0.95, 0.97), small=(0.93, 0.93)), [0, 1], generations=2)
    lines = questions.verdicts(summary, generations=2)
    assert "(91.00%) is above N1's (71.00%) (paired difference +20.0 ± 0.0 (+20.0, +20.0) points: better)" in lines[0]
    assert "(85.50%) is 5.50 points below the dense network: **more than one point below**" in lines[1]
    assert "(KE's paper's measure), it (82.50%) is 8.50 points below the dense network" in lines[2]
    assert lines[3].startswith("**KE's dense network loses to one network trained for as many epochs** (96.00%) by "
                               "5.00 points")
    assert lines[4].startswith("**The fit network loses to the fit-sized network")
    assert "equal-compute network reaches 40.00% (as cut out: 10.00%)" in lines[5]
    assert "same class on 75.00% of the test images at generation 2 (one network trained as long" in lines[6]
    assert "slice of it: 20.00%)" in lines[6]
    assert "fell to 0.40 of the fit channels' (generation 1: 1.00): the dense network turns down" in lines[6]


def test_a_ke_run_that_wins_says_so_and_judges_the_spread(questions):
    summary = questions.summarise(jobs_with(ke_dense=[(0.70, 0.80), (0.90, 0.96)], ke_fit=[(0.2, 0.3), (0.895, 0.955)],
                                            long=(0.88, 0.96), small=(0.80, 0.82)), [0, 1], generations=2)
    lines = questions.verdicts(summary, generations=2)
    assert "0.50 points below the dense network: **within one point**" in lines[1]
    assert "3.50 points below the dense network: **more than one point below**" in lines[2]
    assert lines[3].startswith("KE's dense network beats one network trained for as many epochs (92.00%) by 1.00 points")
    assert lines[3].endswith("within noise).")
    assert "beats the fit-sized network" in lines[4] and lines[4].endswith("better).")


def test_the_reset_channels_are_not_said_to_be_muted_when_their_scale_holds(questions):
    jobs = jobs_with(ke_dense=[(0.7, 0.7), (0.9, 0.9)], ke_fit=[(0.2, 0.2), (0.9, 0.9)], long=(0.9, 0.9),
                     small=(0.9, 0.9))
    for seed in (0, 1):
        jobs["ke", seed]["history"][1]["reset_bn_scale"] = 0.95
    line = questions.verdicts(questions.summarise(jobs, [0, 1], generations=2), generations=2)[6]
    assert "Not by muting the reset channels: their BatchNorm scales are still 0.95" in line


def test_the_reset_channel_scale_compares_the_reset_channels_with_the_fit_ones(questions):
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 2, 1))
    split = kecompress.split(model, "kels", 0.5, example_inputs=torch.zeros(1, 3, 4, 4))
    with torch.no_grad():
        model[1].weight.copy_(torch.where(split.masks["1.weight"], 2.0, -0.5))
    assert questions.reset_channel_scale(model, split) == pytest.approx(0.25)


def test_the_distillation_forms_are_arms_with_their_settings(board):
    assert board.fit_distillation("distill-from-1", 10).start_generation == 1
    ramp = board.fit_distillation("distill-ramp", 10)
    assert (ramp.start_generation, ramp.ramp_epochs) == (1, 10)
    labels = board.fit_distillation("distill-t4-labels", 10)
    assert (labels.temperature, labels.label_weight) == (4.0, 1.0)
    assert board.fit_distillation("ke-distill", 10) == kecompress.distillation.FitDistillation()
    assert board.fit_distillation("long", 10) is None


def test_the_questions_write_their_reports_and_share_their_jobs(tmp_path):
    # The same settings for both (the distillation question's test fraction is another), so they share jobs.
    common = [sys.executable, str(SCRIPT), "--generations", "2", "--epochs", "1", "--seeds", "2", "--per-class", "3",
              "--test-fraction", "0.5",
              "--image-size", "8", "--batch-size", "64", "--workers", "1", "--work-dir", str(tmp_path / "work"),
              "--out-dir", str(tmp_path / "docs")]
    distillation = run_benchmark([*common, "--question", "distillation", "--arms", "ke,ke-distill,distill-ramp,small-scratch"])
    assert distillation.returncode == 0, distillation.stderr[-2000:]
    report = (tmp_path / "docs" / "distillation.md").read_text()
    assert "Command: `python benchmarks/scoreboard.py --generations 2" in report and "--question distillation" in report
    assert "| distill-ramp |" in report and "- distill-ramp against ke-distill (the default), last fit network:" in report
    assert not (tmp_path / "docs" / "results.md").exists()  # a question writes its report only
    generations = run_benchmark([*common, "--question", "generations"])
    assert generations.returncode == 0, generations.stderr[-2000:]
    assert generations.stdout.count("kept from") == 4  # ke and small-scratch: the same jobs; long is new
    report = (tmp_path / "docs" / "generations.md").read_text()
    assert "| 2 | 2 |" in report and "(30 in all)" in report and "## Verdict" in report
    assert (tmp_path / "docs" / "generations.png").stat().st_size > 10_000


def test_a_question_without_the_arms_it_compares_is_refused(tmp_path):
    result = subprocess.run([sys.executable, str(SCRIPT), "--question", "generations", "--arms", "ke,long",
                             "--work-dir", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--question generations compares against small-scratch: add it to --arms" in result.stderr
    assert "Traceback" not in result.stderr and not any(tmp_path.iterdir())


def test_the_augmentation_question_trains_one_network_with_each_augmentation(tmp_path):
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for index, (image, label) in enumerate(zip(digits.images[:60], digits.target[:60])):
        folder = tmp_path / "data" / ("val" if index % 3 == 0 else "train") / f"digit{label}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((image * 16).clip(0, 255).astype("uint8")).convert("RGB").save(folder / f"{index}.png")
    result = run_benchmark([sys.executable, str(SCRIPT), "--question", "augmentation", "--data", str(tmp_path / "data"),
                            "--epochs", "1", "--seeds", "2", "--image-size", "8", "--batch-size", "64", "--workers", "1",
                            "--work-dir", str(tmp_path / "work"), "--out-dir", str(tmp_path / "docs")])
    assert result.returncode == 0, result.stderr[-2000:]
    report = (tmp_path / "docs" / "augmentation.md").read_text()
    assert "trained once for 2 epochs" in report and "40 training images, a test set of 20" in report
    for name in ("resized-crop", "pad-crop", "none"):
        assert f"| {name} |" in report
    jobs = [json.loads(path.read_text()) for path in (tmp_path / "work").glob("augment-*.json")]
    assert sorted({job["settings"]["augment"] for job in jobs}) == ["none", "pad-crop", "resized-crop"]
