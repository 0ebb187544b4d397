"""One owner of the run directory: the command line and the Python API write the same files, read
each other's runs, check "is this the same run?" one way, and resume runs of earlier versions."""

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

import kecompress
from kecompress import GenerationRecord, RunConfig, TrainingConfig, experiment
from kecompress.cli import main
from kecompress.interrupt import RunInterrupted
from kecompress.rundir import RATE_RULE_FIT_FORMAT, RunDirectory, load_fit, read_metrics, save_fit

from conftest import build, example_input, randomise_batchnorm, small_evolution, strip

LANDED = Path(__file__).parent / "data" / "landed"
# The command that made data/landed/landed_cli_run, killed after its first generation (README there).
LANDED_CLI = ["evolve", "tiny.pt", "--image-size", "12", "--generations", "2", "--epochs", "2", "--batch-size", "256",
              "--lr", "0.05", "--seed", "3"]


def same_run(left: Path, right: Path) -> bool:
    """The same records (but their wall time), final dense weights and fit network, bit for bit."""
    def tensors(run: Path) -> dict:
        return {**torch.load(run / "dense.pt", weights_only=True),
                **{f"fit.{key}": value for key, value in torch.load(run / "fit.pt", weights_only=True)["state_dict"].items()}}
    a, b = tensors(left), tensors(right)
    return (a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
            and strip(read_metrics(left)) == strip(read_metrics(right)))


def python_run(run_dir=None, **options):
    return small_evolution(run_dir, generations=3, **options)


def test_a_python_run_writes_what_the_command_line_writes_and_the_cli_reads_it(tmp_path, capsys):
    run_dir = tmp_path / "api"
    loop = python_run(run_dir)
    history = loop.run()
    files = RunDirectory(run_dir)
    for path in (files.config_file, files.split_file, files.checkpoint_file, files.metrics_file, files.chart_file,
                 files.dense_file, files.fit_file, files.source_model_file):
        assert path.is_file(), path.name
    config = files.read_config()
    assert (config.model, config.split, config.rate, config.loaders) == (None, "kels", 0.5, "python")
    assert strip(read_metrics(run_dir)) == strip(history)

    assert main(["report", str(run_dir)]) == 0
    assert main(["export", str(run_dir), "--onnx", "--input-size", "8"]) == 0
    assert (files.onnx_dir / "fit.onnx").is_file()
    # The saved fit network is the one the last generation measured.
    fit = load_fit(files.fit_file, dense=files.build_dense(config))
    assert all(torch.equal(value, loop.fit.state_dict()[key]) for key, value in fit.state_dict().items())
    capsys.readouterr()
    status = main(["evolve", "resnet18", "--out", str(run_dir), "--resume"])
    err = capsys.readouterr().err
    assert status == 2 and "made from Python with data loaders of its own" in err and len(err.splitlines()) == 1


def test_a_python_run_resumes_from_python_and_refuses_other_settings_in_one_check(tmp_path, terminal_sigint):
    reference = python_run().run()

    class StopAt(kecompress.Callback):
        steps = 0

        def on_step_end(self, loop, loss, samples):
            self.steps += 1
            if self.steps == 13:
                loop.request_stop()

    with pytest.raises(RunInterrupted):
        python_run(tmp_path, callbacks=[StopAt()]).run()
    other = dataclasses.replace(python_run(tmp_path).run_config, fit_batchnorm="inherited")
    with pytest.raises(kecompress.KecompressError, match="differs in fit_batchnorm"):
        RunDirectory(tmp_path).check_same_run(other)
    assert strip(python_run(tmp_path).resume().run()) == strip(reference)


def cli_config(model_file: Path, **changes) -> RunConfig:
    training = TrainingConfig(generations=2, epochs=2, lr=0.05, seed=3)
    return RunConfig(model=str(model_file), image_size=12, batch_size=256, seed=3, training=training, **changes)


def test_a_run_built_from_python_is_resumed_by_the_command_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copy(LANDED / "tiny.pt", "tiny.pt")
    assert main([*LANDED_CLI, "--out", "cli"]) == 0

    class StopInGenerationTwo(kecompress.Callback):
        def on_epoch_start(self, loop, generation, epoch):
            if generation == 2:
                loop.request_stop()

    with pytest.raises(RunInterrupted):
        experiment.build(cli_config(Path("tiny.pt")), run_dir="api", callbacks=[StopInGenerationTwo()]).run()
    assert main([*LANDED_CLI, "--out", "api", "--resume"]) == 0
    assert same_run(Path("api"), Path("cli"))


def test_the_command_line_refuses_to_resume_with_other_settings(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(LANDED / "landed_cli_run", "run")
    shutil.copy(LANDED / "tiny.pt", "tiny.pt")
    # (The last of a repeated option counts.)
    for changed, named in ((["--lr", "0.1"], "lr"), (["--fit-batchnorm", "inherited"], "fit_batchnorm"),
                           (["--batch-size", "128"], "batch_size")):
        status = main([*LANDED_CLI, *changed, "--out", "run", "--resume"])
        err = capsys.readouterr().err
        assert status == 2 and f"differs in {named})" in err and len(err.splitlines()) == 1, err


def test_a_run_directory_of_the_landed_version_reports_resumes_and_exports(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    shutil.copy(LANDED / "tiny.pt", "tiny.pt")
    shutil.copytree(LANDED / "landed_cli_run", "landed")
    assert main(["report", "landed"]) == 0  # unfinished: one generation so far
    assert "tiny.pt, KELS rate 0.5, on the digits demo" in capsys.readouterr().out
    assert main([*LANDED_CLI, "--out", "landed", "--resume"]) == 0
    assert main([*LANDED_CLI, "--out", "fresh"]) == 0  # this version, uninterrupted
    assert same_run(Path("landed"), Path("fresh"))
    assert main(["export", "landed", "--onnx"]) == 0


def test_a_python_run_of_the_landed_version_resumes_from_python(tmp_path):
    shutil.copytree(LANDED / "landed_python_run", tmp_path / "run")
    assert not (tmp_path / "run" / "config.json").exists()  # that version wrote none from Python
    history = python_run(tmp_path / "run").resume().run()
    assert strip(history) == strip(python_run().run())
    assert RunDirectory(tmp_path / "run").read_config().loaders == "python"  # written now
    assert [record.generation for record in read_metrics(tmp_path / "run")] == [1, 2, 3]


def test_a_records_json_keys_are_those_of_earlier_versions():
    record = GenerationRecord(2, "accuracy", dense=0.9, fit=0.8, dense_loss=0.3, fit_loss=0.4,
                              dense_parameters=10, fit_parameters=3, train_loss=0.2, seconds=1.5)
    landed = json.loads((LANDED / "landed_cli_run" / "metrics.json").read_text())["generations"][0]
    assert list(record.to_json()) == list(landed)


def edited_resnet18_split():
    """A KELS split of resnet18 whose layer1.0 keeps 40 of its 64 inner channels, chosen at random,
    not the first 32 of the rate rule: conv1's outputs, bn1 and conv2's inputs edited together."""
    model = randomise_batchnorm(build("resnet18")).eval()
    s = kecompress.split(model, "kels", 0.5, example_inputs=example_input("resnet18"))
    kept = torch.zeros(64, dtype=torch.bool)
    kept[torch.randperm(64)[:40]] = True
    s.masks["layer1.0.conv1.weight"][:, :32] = kept[:, None, None, None]
    s.masks["layer1.0.bn1.weight"], s.masks["layer1.0.bn1.bias"] = kept.clone(), kept.clone()
    s.masks["layer1.0.conv2.weight"][:32] = kept[None, :, None, None]
    return model, s, kept


def test_a_fit_saved_from_an_edited_split_reloads_identically(tmp_path):
    model, s, kept = edited_resnet18_split()
    x = example_input("resnet18", batch=2)
    fit = kecompress.slice_fit(model, s, example_inputs=x[:1]).eval()
    assert torch.equal(fit.layer1[0].conv1.weight, model.layer1[0].conv1.weight[kept, :32])
    save_fit(tmp_path / "fit.pt", fit, RunConfig(model="resnet18", num_classes=10), s, (3, 64, 64))
    loaded = load_fit(tmp_path / "fit.pt")
    assert loaded.state_dict().keys() == fit.state_dict().keys()
    assert all(torch.equal(value, fit.state_dict()[key]) for key, value in loaded.state_dict().items())
    with torch.no_grad():
        assert torch.equal(loaded(x), fit(x))


def test_a_fit_file_of_an_earlier_version_is_rebuilt_by_the_rate_rule(tmp_path):
    model = build("resnet18").eval()
    x = example_input("resnet18")
    fit = kecompress.slice_fit(model, kecompress.split(model, "kels", 0.5, example_inputs=x), example_inputs=x)
    torch.save({"format": RATE_RULE_FIT_FORMAT, "arch": "resnet18", "num_classes": 10, "method": "kels", "rate": 0.5,
                "seed": 0, "input_shape": [3, 64, 64], "state_dict": fit.state_dict()}, tmp_path / "fit.pt")
    loaded = load_fit(tmp_path / "fit.pt")
    assert all(torch.equal(value, fit.state_dict()[key]) for key, value in loaded.state_dict().items())
