"""In-place distillation of the fit network and fine-tuning it after the last generation."""

import dataclasses

import pytest
import torch
import torch.nn as nn

import kecompress
from kecompress import Evolution
from kecompress.cli import main
from kecompress.distillation import FitDistillation, FitPass
from kecompress.interrupt import RunInterrupted
from kecompress.rundir import RunDirectory, load_fit

from conftest import StopAtStep, build, loaders, randomise_batchnorm, small_cnn, small_evolution, strip

ARCHS = ["resnet18", "mobilenet_v3_small", "efficientnet_b0", "vgg11_bn", "regnet_x_400mf"]


@pytest.mark.parametrize("arch", ARCHS)
def test_the_fit_pass_is_the_sliced_fit_network_and_trains_only_the_fit_entries(arch):
    model = randomise_batchnorm(build(arch))
    example = torch.randn(1, 3, 32, 32)
    split = kecompress.split(model, "kels", 0.5, example_inputs=example)
    fit_pass = FitPass(model, split, example)
    buffers = {name: buffer.clone() for name, buffer in model.named_buffers()}
    inputs = torch.randn(4, 3, 32, 32)
    sliced = kecompress.slice_fit(model, split, example_inputs=example).train()
    torch.manual_seed(1)  # the same dropout and stochastic depth in all three
    outputs = fit_pass(inputs)
    torch.manual_seed(1)
    torch.testing.assert_close(outputs, sliced(inputs), rtol=1e-4, atol=1e-5)
    outputs.square().sum().backward()
    fit_pass.add_gradients()
    assert all(torch.equal(buffer, buffers[name]) for name, buffer in model.named_buffers())  # dense BN untouched

    # The reference: autograd through the fit entries picked out by the masks (a block mask's
    # entries in row-major order are the block's), the sliced network's own buffers reused.
    dense = dict(model.named_parameters())
    torch.manual_seed(1)
    picked = {name: dense[name][split.masks[name]].reshape(param.shape) if name in split.masks else dense[name]
              for name, param in sliced.named_parameters()}
    reference_outputs = torch.func.functional_call(sliced, {**picked, **dict(sliced.named_buffers())}, (inputs,))
    reference = torch.autograd.grad(reference_outputs.square().sum(), list(dense.values()), allow_unused=True)
    for (name, param), expected in zip(dense.items(), reference):
        expected = torch.zeros_like(param) if expected is None else expected
        got = torch.zeros_like(param) if param.grad is None else param.grad
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6, msg=name)
        if name in split.masks:
            assert not got[~split.masks[name]].any(), name  # nothing reaches the reset entries
    assert any(param.grad is not None and param.grad.any() for param in model.parameters())


def test_the_fit_gradients_add_to_the_dense_ones_where_the_fit_keeps_channels_other_than_the_first():
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(),
                          nn.Conv2d(6, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 4, 1))
    split = kecompress.split(model, "kels", 0.5)
    first, second = torch.tensor([1, 4, 5]), torch.tensor([0, 2, 3])  # the channels each block keeps
    masks = {name: torch.zeros_like(mask) for name, mask in split.masks.items()}
    for name in ("0.weight", "0.bias", "1.weight", "1.bias"):
        masks[name][first] = True
    for name in ("4.weight", "4.bias", "3.bias"):
        masks[name][second] = True
    masks["3.weight"][second[:, None], first] = True
    masks["6.weight"][:, second] = True
    masks["6.bias"][:] = True
    split = dataclasses.replace(split, masks=masks)
    fit_pass = FitPass(model, split, torch.randn(1, 3, 8, 8))
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    dense_grads = {name: param.grad.clone() for name, param in model.named_parameters()}
    fit_pass(torch.randn(2, 3, 8, 8)).sum().backward()
    fit_grads = {name: leaf.grad.clone() for name, leaf in fit_pass._leaves.items()}
    fit_pass.add_gradients()
    for name, param in model.named_parameters():
        added = param.grad - dense_grads[name]
        torch.testing.assert_close(added[masks[name]].reshape(fit_grads[name].shape), fit_grads[name], msg=name)
        assert not added[~masks[name]].any(), name


def test_the_wels_fit_pass_is_the_masked_dense_network():
    model = small_cnn()
    split = kecompress.split(model, "wels", 0.5, seed=1)
    fit_pass = FitPass(model, split, torch.randn(1, 3, 8, 8))
    fit_pass(torch.randn(4, 3, 8, 8)).sum().backward()
    fit_pass.add_gradients()
    for name, param in model.named_parameters():
        if name in split.masks:
            assert param.grad[split.masks[name]].any() and not param.grad[~split.masks[name]].any()


@pytest.mark.parametrize("options, stop_at", [
    ({"fit_distillation": FitDistillation(temperature=2.0, label_weight=0.5)}, 13),  # inside generation 2
    ({"finetune_fit": 2}, 23),  # inside the fine-tuning's second epoch (4 x 5 steps before it)
    ({"fit_distillation": FitDistillation(), "finetune_fit": 2}, 21),
    ({"fit_distillation": FitDistillation(start_generation=1, ramp_epochs=3)}, 7)])  # mid-ramp
def test_a_stopped_run_resumes_bit_for_bit(tmp_path, options, stop_at):
    reference = small_evolution(**options)
    reference_history = reference.run()
    with pytest.raises(RunInterrupted):
        small_evolution(tmp_path, callbacks=[StopAtStep(stop_at)], **options).run()
    resumed = small_evolution(tmp_path, **options).resume()
    assert strip(resumed.run()) == strip(reference_history)
    assert all(torch.equal(value, reference.model.state_dict()[key]) for key, value in resumed.model.state_dict().items())
    assert all(torch.equal(value, reference.fit.state_dict()[key]) for key, value in resumed.fit.state_dict().items())
    if reference.progress.finetune:
        assert strip([resumed.progress.finetune]) == strip([reference.progress.finetune])


def test_distillation_changes_training_and_its_settings_are_the_runs_identity(tmp_path):
    plain, with_distillation = small_evolution().run(), small_evolution(tmp_path, fit_distillation=FitDistillation()).run()
    assert strip(plain) != strip(with_distillation)
    assert RunDirectory(tmp_path).read_config().distill_fit["temperature"] == 1.0
    with pytest.raises(kecompress.KecompressError, match="differs in distill_fit"):
        small_evolution(tmp_path).resume()


def test_the_ramp_raises_the_fit_loss_weight_step_by_step_over_its_epochs():
    loop = small_evolution(fit_distillation=FitDistillation(start_generation=1, ramp_epochs=2))
    step, factors = loop.epochs.step, []

    def recording_step(inputs, targets, optimizer, schedule, distill_factor=0.0):
        factors.append(distill_factor)
        return step(inputs, targets, optimizer, schedule, distill_factor)

    loop.epochs.step = recording_step
    loop.epochs.step.distillation = step.distillation
    history = loop.run()
    assert factors == pytest.approx([n / 10 for n in range(1, 11)] + [1.0] * 10)  # 2 epochs of 5 steps a generation
    without_ramp = small_evolution(fit_distillation=FitDistillation(start_generation=1)).run()
    assert strip(history) != strip(without_ramp)


def test_fine_tuning_trains_the_fit_alone_records_it_and_saves_it(tmp_path):
    loop = small_evolution(tmp_path, finetune_fit=3)
    history = loop.run()
    dense_after_generations = {key: value.clone() for key, value in loop.model.state_dict().items()}
    record = loop.progress.finetune
    assert record.epochs == 3 and 0 <= record.fit <= 1
    saved = RunDirectory(tmp_path)
    assert saved.read_finetune() == record and len(saved.read_metrics()) == len(history)
    fit = load_fit(saved.fit_file, dense=saved.build_dense(saved.read_config()))
    assert all(torch.equal(value, loop.fit.state_dict()[key]) for key, value in fit.state_dict().items())
    without = small_evolution()
    assert strip(without.run()) == strip(history)  # fine-tuning leaves the generations and the dense network alone
    assert all(torch.equal(v, without.model.state_dict()[k]) for k, v in dense_after_generations.items())


def test_fine_tuning_a_wels_fit_is_refused():
    model = small_cnn()
    train, val = loaders()
    with pytest.raises(kecompress.KecompressError, match="needs a KELS split"):
        Evolution(model, kecompress.split(model, "wels", 0.5), train, val, finetune_fit=2)


@pytest.mark.parametrize("argv, message", [
    (["--distill-fit", "--distill-temperature", "0"], "--distill-temperature"),
    (["--distill-fit", "--distill-weight", "-1"], "--distill-weight"),
    (["--distill-fit", "--distill-ramp", "-1"], "--distill-ramp"),
    (["--finetune-fit", "-1"], "--finetune-fit"),
    (["--finetune-fit", "2", "--split", "wels"], "needs a KELS split"),
])
def test_bad_distillation_and_fine_tuning_settings_get_one_line(argv, message, tmp_path, capsys):
    status = main(["evolve", "resnet18", "--image-size", "16", "--out", str(tmp_path / "run"), *argv])
    err = capsys.readouterr().err
    assert status == 2 and message in err and len(err.splitlines()) == 1, err


def test_distillation_trains_under_mixed_precision():
    loop = small_evolution(precision="bf16", fit_distillation=FitDistillation(start_generation=1))
    history = loop.run()
    assert all(0 <= record.fit <= 1 and record.train_loss > 0 for record in history)
    assert all(param.dtype == torch.float32 and torch.isfinite(param).all() for param in loop.model.parameters())
