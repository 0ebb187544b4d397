import json

import pytest
import torch
import torch.nn as nn
from PIL import Image

import kecompress
from kecompress import Evolution, GenerationRecord, TrainingConfig
from kecompress.charts import plot_generations
from kecompress.cli import main
from kecompress.errors import KecompressError
from kecompress.records import metric_of


def run(capsys, *argv):
    status = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def write_metrics(directory, records):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "metrics.json").write_text(json.dumps({"generations": records}))
    return directory


def records(dense, fit):
    return [{"generation": g + 1, "dense_accuracy": d, "fit_accuracy": f, "dense_loss": 1 - d, "fit_loss": 1 - f,
             "dense_parameters": 1000, "fit_parameters": 250, "train_loss": 0.5 / (g + 1), "seconds": 3.0}
            for g, (d, f) in enumerate(zip(dense, fit))]


def png_size(path):
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "demo"
    assert main(["evolve", "resnet18", "--generations", "2", "--epochs", "1", "--batch-size", "128",
                 "--image-size", "16", "--out", str(out)]) == 0
    return out


def test_evolve_draws_the_generations_chart_into_the_run(cli_run):
    assert png_size(cli_run / "generations.png")[0] > 400


def test_report_prints_every_generation_and_redraws_the_runs_chart(cli_run, capsys):
    (cli_run / "generations.png").unlink()
    status, out, err = run(capsys, "report", cli_run)
    assert status == 0, err
    history = json.loads((cli_run / "metrics.json").read_text())["generations"]
    for record in history:
        assert f"{100 * record['dense_accuracy']:.2f}%" in out and f"{100 * record['fit_accuracy']:.2f}%" in out
    assert "resnet18, KELS rate 0.5, on the digits demo" in out
    assert png_size(cli_run / "generations.png")[0] > 400
    status, _, err = run(capsys, "report", cli_run)  # the run's own chart is simply redrawn
    assert status == 0, err


def test_report_charts_several_runs_together(tmp_path, capsys):
    first = write_metrics(tmp_path / "a" / "run", records([0.5, 0.7, 0.8], [0.1, 0.5, 0.79]))
    second = write_metrics(tmp_path / "b" / "run", records([0.6, 0.65], [0.2, 0.6]))
    long = write_metrics(tmp_path / "long", records([0.83], [0.12]))  # one generation: drawn as a level
    chart = tmp_path / "both.png"
    status, out, err = run(capsys, "report", first, second, long, "--out", chart)
    assert status == 0, err
    assert png_size(chart)[0] > 400
    assert str(first) in out and str(second) in out  # same directory names: the whole paths label them
    assert "79.00%" in out and "65.00%" in out and "83.00%" in out
    status, out, err = run(capsys, "report", first, second, "--out", chart, "--label", "kels", "--label", "wels")
    assert status == 2 and "exists" in err and "--force" in err
    status, out, err = run(capsys, "report", first, second, "--out", chart, "--label", "kels", "--label", "wels",
                           "--force")
    assert status == 0, err
    assert "kels" in out and "wels" in out


def test_report_of_a_python_api_run_with_its_own_metric(tmp_path, capsys):
    x, y = torch.randn(64, 4), torch.randn(64, 1)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1))
    neg_mse = lambda out, target: -nn.functional.mse_loss(out, target).item()  # noqa: E731
    Evolution(model, kecompress.split(model, "kels", 0.5), [(x, y)], [(x, y)],
              TrainingConfig(generations=2, epochs=1, lr=0.01), loss_fn=nn.MSELoss(), metric_fn=neg_mse,
              metric_name="neg_mse", run_dir=tmp_path / "api").run()
    status, out, err = run(capsys, "report", tmp_path / "api")
    assert status == 0, err
    assert "dense neg_mse" in out and (tmp_path / "api" / "generations.png").is_file()


@pytest.mark.parametrize("make, argv, message", [
    (lambda d: None, ["{d}/missing"], "does not exist"),
    (lambda d: (d / "empty").mkdir(), ["{d}/empty"], "not a kecompress run directory"),
    (lambda d: ((d / "started").mkdir(), (d / "started" / "config.json").write_text("{}")), ["{d}/started"],
     "not finished a generation yet"),
    (lambda d: ((d / "bad").mkdir(), (d / "bad" / "metrics.json").write_text("{not json")), ["{d}/bad"], "damaged"),
    (lambda d: write_metrics(d / "odd", [{"generation": 1, "dense_accuracy": 0.5}]), ["{d}/odd"],
     "lack dense_<metric> and fit_<metric>"),
    (lambda d: write_metrics(d / "ok", records([0.5], [0.1])), ["{d}/ok", "--out", "{d}/chart.svg"], ".png"),
    (lambda d: write_metrics(d / "ok", records([0.5], [0.1])), ["{d}/ok", "--out", "{d}"], ".png"),
    (lambda d: write_metrics(d / "ok", records([0.5], [0.1])), ["{d}/ok", "--label", "a", "--label", "b"],
     "one --label per run"),
    (lambda d: (write_metrics(d / "x", records([0.5], [0.1])), write_metrics(d / "y", records([0.5], [0.1]))),
     ["{d}/x", "{d}/y", "--label", "same", "--label", "same", "--out", "{d}/c.png"], "same label"),
])
def test_report_refuses_bad_input_in_one_line(tmp_path, capsys, make, argv, message):
    make(tmp_path)
    status, _, err = run(capsys, "report", *[arg.format(d=tmp_path) for arg in argv])
    assert status == 2
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_report_keeps_a_users_file_at_the_default_path_of_several_runs(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    mine = tmp_path / "generations.png"
    mine.write_bytes(b"my own picture")
    write_metrics(tmp_path / "x", records([0.5], [0.1]))
    write_metrics(tmp_path / "y", records([0.6], [0.2]))
    status, _, err = run(capsys, "report", "x", "y")
    assert status == 2 and "--force" in err
    assert mine.read_bytes() == b"my own picture"


def test_a_chart_of_runs_with_different_metrics_is_refused(tmp_path):
    other = [{"generation": 1, "dense_neg_mse": -1.0, "fit_neg_mse": -2.0}]
    assert metric_of(other) == "neg_mse"  # metrics.json of earlier versions named the metric only in its keys
    as_records = lambda runs: [GenerationRecord.from_json(record) for record in runs]  # noqa: E731
    with pytest.raises(KecompressError, match="different metrics"):
        plot_generations({"a": as_records(records([0.5], [0.1])), "b": as_records(other)}, tmp_path / "c.png")
    assert not (tmp_path / "c.png").exists()
