"""`evolve --fit-only`: the fit-sized network trained from scratch, the scoreboard's small-scratch
arm as one command: its shape is the KELS fit's, its start the arm's, and its run directory exports."""

import json

import torch

import kecompress
from kecompress import experiment
from kecompress.cli import main
from kecompress.config import RunConfig, TrainingConfig
from kecompress.rundir import RunDirectory, load_fit
from kecompress.slim import fit_sized


def config(**fields) -> RunConfig:
    return RunConfig(model="resnet18", image_size=12, batch_size=128, seed=3,
                     training=TrainingConfig(generations=1, epochs=1, seed=3), **fields)


def test_the_fit_sized_network_has_the_fit_shape_and_a_fresh_seeded_start():
    model = kecompress.models.build_model("resnet18", 10)
    example = torch.zeros(1, 3, 16, 16)
    slim, shaping = fit_sized(model, 0.5, example_inputs=example, seed=1)
    cut = kecompress.slice_fit(model, shaping, example_inputs=example)
    assert {name: p.shape for name, p in slim.named_parameters()} == {name: p.shape for name, p in cut.named_parameters()}
    assert not torch.equal(slim.conv1.weight, cut.conv1.weight)  # re-initialised, not the dense network's entries
    again, _ = fit_sized(model, 0.5, example_inputs=example, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(slim.state_dict().values(), again.state_dict().values()))


def trained_by_hand(loop: kecompress.Evolution) -> kecompress.Evolution:
    """The recipe written out: ``loop``'s fit cut out, every layer re-initialised, trained alone
    on ``loop``'s data, loss and schedule, with nothing to reset."""
    example = loop.example_input()
    slim = kecompress.slice_fit(loop.model, loop.split, example_inputs=example)
    torch.manual_seed(loop.run_config.seed)
    for module in slim.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    whole = kecompress.split(slim, "kels", 1.0, example_inputs=example, seed=loop.split.seed)
    return kecompress.Evolution(slim, whole, loop.train_loader, loop.val_loader, loop.config, loss_fn=loop.loss_fn,
                                example_inputs=example)


def test_fit_only_trains_exactly_the_fit_sized_network_from_scratch():
    by_hand = trained_by_hand(experiment.build(config()))
    direct = experiment.build(config(fit_only=True))
    assert [record.to_json() | {"seconds": 0} for record in by_hand.run()] == \
        [record.to_json() | {"seconds": 0} for record in direct.run()]
    assert all(torch.equal(a, b) for a, b in zip(by_hand.model.state_dict().values(), direct.model.state_dict().values()))


def test_a_fit_only_run_exports_and_its_fit_file_loads(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["evolve", "resnet18", "--fit-only", "--generations", "1", "--epochs", "1", "--image-size", "12",
            "--batch-size", "128", "--out", str(out)]
    assert main(argv) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert "the network of its KELS fit's shape at rate 0.5, from scratch" in printed
    saved = json.loads((out / "config.json").read_text())
    assert saved["fit_only"] is True and saved["rate"] == 0.5
    dense, split, _ = RunDirectory(out).load()
    assert dense.conv1.out_channels == 32 and split.fit_fraction() == 1.0  # all of it is fit
    fit = load_fit(out / "fit.pt")  # rebuilt from the architecture's name and the fit channels
    assert {name: p.shape for name, p in fit.named_parameters()} == {name: p.shape for name, p in dense.named_parameters()}
    assert main(["export", str(out), "--onnx"]) == 0
    assert (out / "onnx" / "fit.onnx").is_file()
