"""Mixed precision, channels-last and torch.compile: every path that runs on a CPU, run on one."""

import dataclasses
import json
import os
import signal

import pytest
import torch
import torch.nn as nn

import kecompress
from kecompress import Callback, KecompressError
from kecompress.cli import main
from kecompress.interrupt import RunInterrupted
from kecompress.acceleration import MixedPrecision
from kecompress.rundir import load_run

from conftest import small_evolution


def evolution(run_dir=None, **options):
    return small_evolution(run_dir, **options)


class ConvOutputs:
    """Records the dtype of the first convolution's output in training and in evaluation (of this
    model: slicing the fit copies the hook, and traces the copy in float32)."""

    def __init__(self, model):
        self.dtypes, conv = set(), model[0]
        conv.register_forward_hook(
            lambda module, inputs, output: self.dtypes.add((module.training, output.dtype)) if module is conv else None)


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_mixed_precision_trains_and_evaluates_under_autocast_with_float32_weights(precision, dtype):
    run = evolution(precision=precision)
    spy = ConvOutputs(run.model)
    history = run.run()
    assert spy.dtypes == {(True, dtype), (False, dtype)}
    assert all(param.dtype == torch.float32 for param in run.model.parameters())
    assert all(0 <= record.dense <= 1 and record.train_loss > 0 for record in history)


def overflowing_loss(at_step):
    calls = {"n": 0}

    def loss(outputs, targets):
        calls["n"] += 1
        value = nn.functional.cross_entropy(outputs, targets)
        return value * float("inf") if calls["n"] == at_step else value
    return loss


def test_fp16_skips_a_step_whose_loss_overflowed():
    run = evolution(precision="fp16", loss_fn=overflowing_loss(at_step=3))
    history = run.run()  # no error: the scaler skipped the step and lowered its scale
    assert run.amp.scaler.get_scale() < 65536.0
    assert all(torch.isfinite(param).all() for param in run.model.parameters())
    assert len(history) == 2


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_without_a_scaler_an_overflow_is_divergence(precision):
    run = evolution(precision=precision, loss_fn=overflowing_loss(at_step=3))
    with pytest.raises(KecompressError, match="generation 1, epoch 1, step 3.*lower the learning rate"):
        run.run()


class CtrlC(Callback):
    """Presses Ctrl-C (a real SIGINT) at the given training step."""

    def __init__(self, at_step):
        self.at_step, self.steps = at_step, 0

    def on_step_end(self, loop, loss, samples):
        self.steps += 1
        if self.steps == self.at_step:
            os.kill(os.getpid(), signal.SIGINT)


def test_fp16_checkpoints_its_scaler_and_a_resumed_run_matches(tmp_path, terminal_sigint):
    reference = evolution(precision="fp16")
    reference_history = reference.run()
    with pytest.raises(RunInterrupted):
        evolution(tmp_path, callbacks=[CtrlC(at_step=13)], precision="fp16").run()
    assert "scale" in torch.load(tmp_path / "checkpoint.pt", weights_only=True)["scaler"]
    resumed = evolution(tmp_path, precision="fp16").resume()
    history = resumed.run()
    strip = lambda h: [dataclasses.replace(record, seconds=None) for record in h]  # noqa: E731
    assert strip(history) == strip(reference_history)
    assert all(torch.equal(v, reference.model.state_dict()[k]) for k, v in resumed.model.state_dict().items())
    assert resumed.amp.scaler.get_scale() == reference.amp.scaler.get_scale()


def test_channels_last_trains_the_same_network_and_saves_the_usual_state_dict():
    plain, fast = evolution(), evolution(channels_last=True)
    assert fast.model[0].weight.is_contiguous(memory_format=torch.channels_last)
    plain_history, fast_history = plain.run(), fast.run()
    assert fast_history[-1].dense_loss == pytest.approx(plain_history[-1].dense_loss, rel=1e-4)
    assert fast.model.state_dict().keys() == plain.model.state_dict().keys()
    for key, value in fast.model.state_dict().items():
        torch.testing.assert_close(value, plain.model.state_dict()[key], rtol=1e-4, atol=1e-5)


def test_compile_trains_the_same_network_across_resets():
    plain, compiled = evolution(), evolution(compile_model=True)
    plain.run(), compiled.run()
    assert compiled.model.state_dict().keys() == plain.model.state_dict().keys()  # no "_orig_mod."
    for key, value in compiled.model.state_dict().items():
        torch.testing.assert_close(value, plain.model.state_dict()[key], rtol=1e-3, atol=1e-4)


def test_the_command_line_with_bf16_and_channels_last_writes_an_ordinary_run(tmp_path, capsys):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    torch.save(model, tmp_path / "tiny.pt")
    out = tmp_path / "run"
    status = main(["evolve", str(tmp_path / "tiny.pt"), "--image-size", "12", "--generations", "2", "--epochs", "1",
                   "--batch-size", "256", "--precision", "bf16", "--channels-last", "--out", str(out)])
    assert status == 0, capsys.readouterr().err
    assert "bf16" in capsys.readouterr().out
    dense, split, config = load_run(out)
    assert len(json.loads((out / "metrics.json").read_text())["generations"]) == 2


def test_flags_the_machine_cannot_honour_are_refused_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CXX", "no-such-compiler")
    assert main(["evolve", "resnet18", "--compile", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("kecompress: torch.compile on the CPU needs a C++ compiler and no-such-compiler was not found: "
                   "install one (e.g. apt install g++) or drop --compile")
    assert not (tmp_path / "run").exists()


def test_an_unknown_precision_is_refused_by_the_python_api():
    with pytest.raises(KecompressError, match="unknown precision 'fp8'"):
        MixedPrecision("fp8")
