import json
import os
import signal

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import kecompress
from kecompress import Callback, Evolution, GenerationRecord, KecompressError, TrainingConfig
from kecompress.evaluation import accuracy, evaluate
from kecompress.interrupt import RunInterrupted
from kecompress.prune import fit_hypothesis

from conftest import loaders, small_cnn, strip


class Snapshots(Callback):
    """A callback that keeps the weights at the start and end of every generation."""

    def __init__(self, model, fail_at=None):
        self.model, self.fail_at = model, fail_at
        self.starts, self.ends, self.steps = {}, {}, 0
        self.generation = 0

    def on_generation_start(self, loop, generation):
        self.generation = generation
        self.starts[generation] = {k: v.clone() for k, v in self.model.state_dict().items()}

    def on_step_end(self, loop, loss, samples):
        self.steps += 1
        if self.fail_at is not None and self.steps == self.fail_at:
            raise KeyboardInterrupt  # the run dies mid-epoch

    def on_generation_end(self, loop, record):
        self.ends[record.generation] = {k: v.clone() for k, v in self.model.state_dict().items()}


@pytest.mark.parametrize("method", ["kels", "wels"])
def test_every_generation_keeps_the_fit_and_redraws_the_reset(method):
    torch.manual_seed(0)
    model = small_cnn()
    s = kecompress.split(model, method, 0.5, example_inputs=torch.randn(1, 3, 8, 8), seed=1)
    masks = {k: v.clone() for k, v in s.masks.items()}
    train, val = loaders()
    spy = Snapshots(model)
    history = Evolution(model, s, train, val, TrainingConfig(generations=3, epochs=1, lr=0.05),
                        callbacks=[spy]).run()
    assert [r.generation for r in history] == [1, 2, 3]
    for generation in (2, 3):
        before, after = spy.ends[generation - 1], spy.starts[generation]
        for name, mask in masks.items():
            if name.startswith(("1.", "4.")):  # BatchNorm: kept whole, as in the reference
                assert torch.equal(before[name], after[name])
                continue
            assert torch.equal(after[name][mask], before[name][mask])  # fit: bit for bit
            if (~mask).any():
                assert not torch.equal(after[name][~mask], before[name][~mask])
    assert all(torch.equal(s.masks[k], masks[k]) for k in masks)  # the mask never changes
    for record in history:
        assert 0 <= record.dense <= 1 and 0 <= record.fit <= 1
        assert record.fit_parameters < record.dense_parameters


def test_kels_fit_is_measured_on_the_sliced_network_as_cut_out():
    torch.manual_seed(0)
    model = small_cnn()
    s = kecompress.split(model, "kels", 0.5, example_inputs=torch.randn(1, 3, 8, 8))
    train, val = loaders()
    record = Evolution(model, s, train, val, TrainingConfig(generations=1, epochs=1),
                       fit_batchnorm="inherited").run()[0]
    fit = kecompress.slice_fit(model, s, example_inputs=torch.randn(1, 3, 8, 8))
    assert record.fit_parameters == sum(p.numel() for p in fit.parameters()) == s.fit_count()
    loss, acc = evaluate(fit, val, nn.CrossEntropyLoss(), accuracy)
    assert record.fit == acc and record.fit_loss == pytest.approx(loss)


def test_the_fit_networks_batchnorm_statistics_are_re_estimated_for_it_alone():
    torch.manual_seed(0)
    model = small_cnn()
    s = kecompress.split(model, "kels", 0.5, example_inputs=torch.randn(1, 3, 8, 8))
    train, val = loaders()
    # Equal batches, so that the average of the batches' means is the mean over the images.
    train = DataLoader(train.dataset, batch_size=12, shuffle=True, generator=torch.Generator().manual_seed(0))
    evolution = Evolution(model, s, train, val, TrainingConfig(generations=1, epochs=1))
    record = evolution.run()[0]
    dense_state = {k: v.clone() for k, v in model.state_dict().items()}
    fit = evolution.fit_network()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in dense_state.items())  # the model is untouched
    as_cut = kecompress.slice_fit(model, s, example_inputs=torch.randn(1, 3, 8, 8))
    assert all(torch.equal(p, q) for p, q in zip(fit.parameters(), as_cut.parameters()))  # the same weights
    assert not torch.allclose(fit[1].running_mean, as_cut[1].running_mean)  # statistics of its own
    # Its first BatchNorm sees the fit's first conv on the training images: their channel means.
    with torch.no_grad():
        images = torch.cat([x for x, _ in train])
        assert torch.allclose(fit[1].running_mean, fit[0](images).mean(dim=(0, 2, 3)), atol=1e-5)
    again = evolution.fit_network()  # from the run's own seed: the same network every time
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in fit.state_dict().items())
    loss, acc = evaluate(fit, val, nn.CrossEntropyLoss(), accuracy)
    assert record.fit == acc and record.fit_loss == pytest.approx(loss)
    assert all(torch.equal(v, evolution.fit.state_dict()[k]) for k, v in fit.state_dict().items())  # as measured


def test_a_wels_fit_network_is_the_dense_one_with_the_reset_weights_zeroed():
    torch.manual_seed(0)
    model = small_cnn()
    s = kecompress.split(model, "wels", 0.5, seed=3)
    train, val = loaders()
    evolution = Evolution(model, s, train, val, TrainingConfig(generations=1, epochs=1), fit_batchnorm="inherited")
    record = evolution.run()[0]
    fit = evolution.fit_network()
    for name, param in fit.named_parameters():
        expected = model.state_dict()[name] * s.masks[name] if name in s.masks else model.state_dict()[name]
        assert torch.equal(param, expected)
    with fit_hypothesis(model, s):  # the same network as through the prune API
        assert record.fit == evaluate(model, val, nn.CrossEntropyLoss(), accuracy)[1]


def test_a_regression_loss_and_metric_work_through_the_api():
    torch.manual_seed(0)
    x = torch.randn(64, 5)
    y = x @ torch.randn(5, 2)
    data = DataLoader(TensorDataset(x, y), batch_size=16)
    model = nn.Sequential(nn.Linear(5, 32), nn.ReLU(), nn.Linear(32, 2))
    s = kecompress.split(model, "kels", 0.5)
    r2 = lambda out, tgt: 1 - ((out - tgt) ** 2).sum().item() / ((tgt - tgt.mean(0)) ** 2).sum().item()
    history = kecompress.evolve(model, s, data, data, TrainingConfig(generations=2, epochs=3, lr=0.01),
                                loss_fn=nn.MSELoss(), metric_fn=r2, metric_name="r2")
    assert {"dense_r2", "fit_r2", "dense_loss", "fit_loss"} <= set(history[-1].to_json())
    assert history[-1].dense_loss < history[0].dense_loss * 2


def test_a_target_ends_the_run_early():
    torch.manual_seed(0)
    model = small_cnn()
    s = kecompress.split(model, "wels", 0.5)
    train, val = loaders()
    history = Evolution(model, s, train, val, TrainingConfig(generations=5, epochs=1, target=0.0)).run()
    assert len(history) == 1


def test_a_diverging_loss_stops_with_a_message(tmp_path):
    torch.manual_seed(0)
    model = small_cnn()
    s = kecompress.split(model, "wels", 0.5)
    train, val = loaders()
    loss = lambda out, tgt: nn.functional.cross_entropy(out, tgt) * float("inf")
    with pytest.raises(KecompressError, match=r"generation 1, epoch 1, step 1.*lower the learning rate"):
        Evolution(model, s, train, val, TrainingConfig(generations=2, epochs=1), loss_fn=loss,
                  run_dir=tmp_path).run()


def run_to_the_end(run_dir, fail_at=None, resume=False):
    torch.manual_seed(0)
    model = small_cnn()
    s = kecompress.split(model, "kels", 0.5, example_inputs=torch.randn(1, 3, 8, 8))
    train, val = loaders()
    evolution = Evolution(model, s, train, val, TrainingConfig(generations=3, epochs=2, lr=0.05, seed=4),
                          run_dir=run_dir, callbacks=[Snapshots(model, fail_at)])
    if resume:
        evolution.resume()
    return model, evolution.run()


def test_a_resumed_run_ends_exactly_where_an_uninterrupted_one_does(tmp_path):
    reference, reference_history = run_to_the_end(tmp_path / "a")
    for fail_at in (3, 10, 16):  # mid-epoch in generation 1, 2 and 3 (5 steps an epoch)
        run_dir = tmp_path / f"b{fail_at}"
        with pytest.raises(KeyboardInterrupt):
            run_to_the_end(run_dir, fail_at=fail_at)
        model, history = run_to_the_end(run_dir, resume=True)
        assert all(torch.equal(v, reference.state_dict()[k]) for k, v in model.state_dict().items())
        assert strip(history) == strip(reference_history)
        saved = json.loads((run_dir / "metrics.json").read_text())["generations"]
        assert strip(GenerationRecord.from_json(record) for record in saved) == strip(reference_history)


def test_resume_refuses_a_checkpoint_made_with_other_settings(tmp_path):
    run_to_the_end(tmp_path)
    model = small_cnn()
    s = kecompress.split(model, "kels", 0.5, example_inputs=torch.randn(1, 3, 8, 8))
    train, val = loaders()
    other = Evolution(model, s, train, val, TrainingConfig(generations=3, epochs=2, lr=0.5, seed=4), run_dir=tmp_path)
    with pytest.raises(KecompressError, match="different run.*differs in lr"):
        other.resume()


@pytest.mark.parametrize("field, value, message", [("generations", 0, "generations"), ("epochs", 0, "epochs"),
                                                   ("lr", -1.0, "learning rate"), ("warmup_epochs", 10, "warm-up")])
def test_bad_training_settings_are_refused(field, value, message):
    with pytest.raises(KecompressError, match=message):
        TrainingConfig(**{field: value})


class CtrlC(Snapshots):
    """Presses Ctrl-C (a real SIGINT) at the given training step, ``presses`` times in a row."""

    def __init__(self, model, fail_at, presses=1):
        super().__init__(model, fail_at)
        self.presses = presses

    def on_step_end(self, loop, loss, samples):
        self.steps += 1
        if self.steps == self.fail_at:
            for _ in range(self.presses):
                os.kill(os.getpid(), signal.SIGINT)


# Once: stop after the step with a mid-epoch checkpoint. Twice, an impatient user: stop at once,
# and the last end-of-epoch checkpoint resumes. Either way the resumed run is the uninterrupted one.
@pytest.mark.parametrize("presses, stops_with", [
    (1, pytest.raises(RunInterrupted, match="generation 2, epoch 1, step 3; a checkpoint was saved")),
    (2, pytest.raises(KeyboardInterrupt))])
def test_ctrl_c_stops_and_the_resumed_run_matches(tmp_path, presses, stops_with, terminal_sigint):
    reference, reference_history = run_to_the_end(tmp_path / "a")
    torch.manual_seed(0)
    model = small_cnn()
    s = kecompress.split(model, "kels", 0.5, example_inputs=torch.randn(1, 3, 8, 8))
    train, val = loaders()
    config = TrainingConfig(generations=3, epochs=2, lr=0.05, seed=4)
    with stops_with:
        Evolution(model, s, train, val, config, run_dir=tmp_path / "b", callbacks=[CtrlC(model, 13, presses)]).run()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler given back
    assert list((tmp_path / "b").glob(".*.tmp")) == []  # nothing left half-written
    model, history = run_to_the_end(tmp_path / "b", resume=True)
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in model.state_dict().items())
    assert strip(history) == strip(reference_history)


@pytest.mark.parametrize("handler", [signal.SIG_IGN, lambda signum, frame: None])
def test_a_run_gives_back_the_sigint_handler_it_found_and_keeps_ignoring_an_ignored_sigint(tmp_path, handler):
    previous = signal.signal(signal.SIGINT, handler)
    try:
        model = small_cnn()
        s = kecompress.split(model, "kels", 0.5, example_inputs=torch.randn(1, 3, 8, 8))
        train, val = loaders()
        presses = CtrlC(model, fail_at=3)
        history = Evolution(model, s, train, val, TrainingConfig(generations=2, epochs=1), run_dir=tmp_path,
                            callbacks=[presses]).run()
        if handler is signal.SIG_IGN:  # a job whose parent ignores Ctrl-C runs on, as Python itself would
            assert len(history) == 2
        assert signal.getsignal(signal.SIGINT) is handler
    except RunInterrupted:  # any other handler: the run's own guard took the press
        assert handler is not signal.SIG_IGN and signal.getsignal(signal.SIGINT) is handler
    finally:
        signal.signal(signal.SIGINT, previous)


def test_resume_refuses_a_checkpoint_of_another_split(tmp_path):
    run_to_the_end(tmp_path)
    model = small_cnn()
    s = kecompress.split(model, "kels", 0.25, example_inputs=torch.randn(1, 3, 8, 8))
    train, val = loaders()
    other = Evolution(model, s, train, val, TrainingConfig(generations=3, epochs=2, lr=0.05, seed=4), run_dir=tmp_path)
    with pytest.raises(KecompressError, match="different run.*differs in rate"):
        other.resume()


def test_the_first_generation_is_plain_training():
    # benchmarks/questions.py reports KE's generation 1 as N1, one generation of plain training.
    def first_generation(generations):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))
        data = [(torch.randn(8, 4), torch.randint(0, 2, (8,))) for _ in range(3)]
        the_split = kecompress.split(model, "kels", 0.5)
        history = Evolution(model, the_split, data, data, TrainingConfig(generations=generations, epochs=2)).run()
        return strip(history)[0]

    assert first_generation(3) == first_generation(1)
