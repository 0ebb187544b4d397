"""Callbacks: a callback written outside the package sees every event with the loop; TensorBoard."""

import sys

import pytest
import torch

import kecompress
from kecompress import Callback, Evolution, KecompressError, TrainingConfig
from kecompress.callbacks import TensorBoard
from kecompress.cli import main
from kecompress.interrupt import RunInterrupted

from conftest import loaders, small_cnn


class Journal(Callback):
    """Writes down every event, with what the loop says at that moment."""

    def __init__(self):
        self.events = []

    def on_run_start(self, loop):
        self.events.append(("run_start", loop.progress.generation))

    def on_generation_start(self, loop, generation):
        self.events.append(("generation_start", generation, loop.optimizer is not None))

    def on_reset(self, loop, generation):
        self.events.append(("reset", generation))

    def on_epoch_start(self, loop, generation, epoch):
        self.events.append(("epoch_start", generation, epoch))

    def on_step_end(self, loop, loss, samples):
        self.events.append(("step", samples))

    def on_epoch_end(self, loop, generation, epoch):
        self.events.append(("epoch_end", generation, epoch, loop.progress.epochs_done))

    def on_generation_end(self, loop, record):
        self.events.append(("generation_end", record.generation, len(loop.progress.history)))

    def on_interrupt(self, loop):
        self.events.append(("interrupt", loop.progress.epoch.steps))

    def on_run_end(self, loop):
        self.events.append(("run_end", loop.fit is not None))


def evolution(**options):
    model = small_cnn()
    split = kecompress.split(model, "kels", 0.5, example_inputs=torch.randn(1, 3, 8, 8))
    train, val = loaders()
    return Evolution(model, split, train, val, TrainingConfig(generations=2, epochs=2, lr=0.05), **options)


def test_a_callback_receives_every_event_in_order_with_the_loop():
    journal = Journal()
    history = evolution(callbacks=[journal]).run()
    steps = [("step", 8)] * 4 + [("step", 4)]  # 36 images in batches of 8
    epoch = lambda g, e: [("epoch_start", g, e), *steps, ("epoch_end", g, e, e + 1)]  # noqa: E731
    assert journal.events == [
        ("run_start", 1),
        ("generation_start", 1, True), *epoch(1, 0), *epoch(1, 1), ("generation_end", 1, 1),
        ("reset", 2), ("generation_start", 2, True), *epoch(2, 0), *epoch(2, 1), ("generation_end", 2, 2),
        ("run_end", True)]
    assert [record.generation for record in history] == [1, 2]


def test_a_callback_can_stop_the_run_with_a_checkpoint(tmp_path):
    class StopAtStep(Journal):
        def on_step_end(self, loop, loss, samples):
            super().on_step_end(loop, loss, samples)
            if len([event for event in self.events if event[0] == "step"]) == 7:
                loop.request_stop()

    journal = StopAtStep()
    with pytest.raises(RunInterrupted, match="generation 1, epoch 2, step 2; a checkpoint was saved"):
        evolution(callbacks=[journal], run_dir=tmp_path).run()
    assert journal.events[-1] == ("interrupt", 2)
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["epoch_progress"]["steps"] == 2


def test_tensorboard_writes_event_files_that_tensorboard_reads(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    history = evolution(callbacks=[TensorBoard(tmp_path / "tb")]).run()
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "dense/accuracy", "fit/accuracy", "dense/loss", "fit/loss"} <= tags
    assert [event.step for event in events.Scalars("train/loss")] == list(range(1, 21))  # 2 x 2 x 5 steps
    fit = events.Scalars("fit/accuracy")
    assert [event.step for event in fit] == [1, 2]
    assert fit[-1].value == pytest.approx(history[-1].fit)


def test_tensorboard_from_the_command_line(tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    status = main(["evolve", "resnet18", "--generations", "1", "--epochs", "1", "--batch-size", "256",
                   "--image-size", "16", "--out", str(tmp_path / "run"), "--tensorboard", str(tmp_path / "tb")])
    assert status == 0, capsys.readouterr().err
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert len(events.Scalars("train/loss")) == 6 and len(events.Scalars("dense/accuracy")) == 1


def test_without_tensorboard_installed_one_line_names_the_install_command(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if the package were missing
    with pytest.raises(KecompressError, match=r"pip install 'kecompress\[tensorboard\]'"):
        TensorBoard(tmp_path / "tb")
    status = main(["evolve", "resnet18", "--out", str(tmp_path / "run"), "--tensorboard", str(tmp_path / "tb")])
    err = capsys.readouterr().err
    assert status == 2 and err == "kecompress: TensorBoard logging needs the tensorboard package: " \
                                  "pip install 'kecompress[tensorboard]'\n"
    assert not (tmp_path / "run").exists()
