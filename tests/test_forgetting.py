"""What happens between generations, chosen per run: what each forgetting strategy changes and
keeps (bit for bit where promised, on several torchvision architectures), that the loop calls it
with the reset seed (so runs are reproducible and resume bit for bit), and that a run is resumed
only with the strategy it was started with."""

import copy
import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import kecompress
from kecompress import Evolution, KecompressError, TrainingConfig
from kecompress.cli import main
from kecompress.forgetting import (LaterLayers, ResetHypothesis, ShrinkPerturb, WarmRestart, default_start,
                                   from_settings, settings_of)
from kecompress.interrupt import RunInterrupted
from kecompress.rundir import RunDirectory
from kecompress.seeds import reset_seed

from conftest import build, loaders, randomise_batchnorm, small_cnn

ARCHS = ["resnet18", "mobilenet_v3_small", "vgg11_bn", "efficientnet_b0"]
SEED = 1234
CONV_OR_LINEAR = (nn.Conv2d, nn.Linear)
LANDED = Path(__file__).parent / "data" / "landed"
TINY = ["evolve", "tiny.pt", "--image-size", "12", "--generations", "2", "--epochs", "1", "--batch-size", "256",
        "--lr", "0.05", "--seed", "3"]


def trained_looking(name: str) -> nn.Module:
    return randomise_batchnorm(build(name))


def tensors(model: nn.Module) -> dict:
    return {key: value.clone() for key, value in model.state_dict().items()}


def assert_same(model: nn.Module, expected: nn.Module) -> None:
    """Every parameter and buffer of ``model`` equals ``expected``'s, bit for bit."""
    mine, theirs = model.state_dict(), expected.state_dict()
    assert mine.keys() == theirs.keys()
    for key in mine:
        assert torch.equal(mine[key], theirs[key]), key


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "efficientnet_b0"])
def test_ke_is_kecompress_reset(name):
    model = trained_looking(name)
    split = kecompress.split(model, "kels", 0.5, example_inputs=torch.zeros(1, 3, 32, 32))
    expected = kecompress.reset_(copy.deepcopy(model), split, seed=SEED)
    ResetHypothesis().forget_(model, split, seed=SEED)
    assert_same(model, expected)


@pytest.mark.parametrize("name, start", [(name, None) for name in ARCHS] + [("resnet18", "layer3.1")])
def test_llf_keeps_what_precedes_its_start_and_redraws_every_conv_and_linear_layer_after(name, start):
    model = trained_looking(name)
    before = copy.deepcopy(model)
    rng = torch.get_rng_state()
    LaterLayers(start).forget_(model, split=None, seed=SEED)
    assert torch.equal(torch.get_rng_state(), rng)  # the data order and augmentation draw as before

    start = start or default_start(model)
    expected = copy.deepcopy(before)  # the layers' own reset_parameters, from the seed, in definition order
    torch.manual_seed(SEED)
    names = [module_name for module_name, _ in expected.named_modules()]
    for _, module in list(expected.named_modules())[names.index(start):]:
        if isinstance(module, CONV_OR_LINEAR):
            module.reset_parameters()
    assert_same(model, expected)

    reached = False
    for (module_name, module), old in zip(model.named_modules(), before.modules()):
        reached = reached or module_name == start
        redrawn = reached and isinstance(module, CONV_OR_LINEAR)
        for param, old_param in zip(module.parameters(recurse=False), old.parameters(recurse=False)):
            assert torch.equal(param, old_param) != redrawn, module_name  # a fresh draw, or kept bit for bit
        for buffer, old_buffer in zip(module.buffers(recurse=False), old.buffers(recurse=False)):
            assert torch.equal(buffer, old_buffer), module_name  # BatchNorm statistics kept


@pytest.mark.parametrize("name, start", [
    ("resnet18", "layer4"), ("resnet50", "layer4"), ("mobilenet_v2", "features.18"),
    ("mobilenet_v3_small", "features.12"), ("efficientnet_b0", "features.8"), ("vgg11_bn", "features.25"),
    ("densenet121", "features.denseblock4"), ("regnet_x_400mf", "trunk_output.block4")])
def test_llf_starts_by_default_at_the_last_stage_of_each_family(name, start):
    assert LaterLayers().for_model(build(name)) == LaterLayers(start)


def test_llf_refuses_a_start_the_model_lacks_naming_its_stages():
    with pytest.raises(KecompressError, match="nosuch names no module of this model: pass one of "
                                              "conv1, layer1, layer2, layer3, layer4, fc"):
        LaterLayers("nosuch").forget_(build("resnet18"), split=None, seed=SEED)


@pytest.mark.parametrize("model", [nn.Sequential(nn.Flatten(), nn.Linear(12, 10)),
                                   nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8, 10))])
def test_llf_asks_for_a_start_where_the_model_has_no_stage_after_its_first_convolution(model):
    with pytest.raises(KecompressError, match="pass --forget-from with the module to re-draw from, one of"):
        LaterLayers().for_model(model)


@pytest.mark.parametrize("name", ARCHS)
def test_shrink_perturb_mixes_every_parameter_with_a_fresh_draw_of_its_layer(name):
    model = trained_looking(name)
    before = copy.deepcopy(model)
    rng = torch.get_rng_state()
    ShrinkPerturb(shrink=0.4, perturb=0.1).forget_(model, split=None, seed=SEED)
    assert torch.equal(torch.get_rng_state(), rng)

    fresh = copy.deepcopy(before)  # these networks hold parameters in conv, linear and BatchNorm layers alone
    torch.manual_seed(SEED)
    for module in fresh.modules():
        if isinstance(module, (*CONV_OR_LINEAR, nn.BatchNorm2d)):
            module.reset_parameters()
    for (key, param), old, new in zip(model.named_parameters(), before.parameters(), fresh.parameters()):
        assert torch.equal(param, 0.4 * old + 0.1 * new), key
    for (key, buffer), new in zip(model.named_buffers(), fresh.buffers()):
        assert torch.equal(buffer, new), key  # BatchNorm statistics start afresh, as in their code


def test_shrink_perturb_only_shrinks_a_parameter_without_an_initialisation_it_can_draw():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear, self.scale = nn.Linear(3, 3), nn.Parameter(torch.full((3,), 2.0))

    model = Scaled()
    ShrinkPerturb(shrink=0.5, perturb=0.1).forget_(model, split=None, seed=SEED)
    assert model.scale.tolist() == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("settings, message", [(dict(shrink=2), "shrink must be in [0, 1], got 2"),
                                               (dict(perturb=-0.1), "perturb must be in [0, 1]")])
def test_shrink_perturb_refuses_settings_outside_zero_to_one(settings, message):
    with pytest.raises(KecompressError, match=message.replace("[", r"\[").replace("]", r"\]")):
        ShrinkPerturb(**settings)


def test_none_changes_nothing():
    model = trained_looking("resnet18")
    before = copy.deepcopy(model)
    WarmRestart().forget_(model, split=None, seed=SEED)
    assert_same(model, before)


class Recorder:
    """A strategy of a user's own: records what the loop calls it with."""

    def __init__(self):
        self.calls = []

    def forget_(self, model, split, seed=None):
        self.calls.append((model, split, seed))


def small_run(forgetting=None, run_dir=None, callbacks=(), generations=3, epochs=2) -> Evolution:
    torch.manual_seed(0)
    model = small_cnn()
    split = kecompress.split(model, "kels", 0.5, example_inputs=torch.randn(1, 3, 8, 8))
    train, val = loaders()
    return Evolution(model, split, train, val, TrainingConfig(generations=generations, epochs=epochs, lr=0.05, seed=4),
                     forgetting=forgetting, run_dir=run_dir, callbacks=callbacks)


def test_a_strategy_of_your_own_is_called_with_the_model_the_split_and_the_reset_seed():
    recorder = Recorder()
    loop = small_run(recorder, epochs=1)
    loop.run()
    assert [(model is loop.model, split is loop.split, seed) for model, split, seed in recorder.calls] == \
        [(True, True, reset_seed(4, 2)), (True, True, reset_seed(4, 3))]
    assert loop.run_config.forget == {"name": "python", "class": "test_forgetting.Recorder"}


def test_an_object_without_forget_is_refused_in_one_line():
    with pytest.raises(KecompressError, match="needs a forget_.model, split, seed=None. method, which object lacks"):
        small_run(object())


@pytest.mark.parametrize("strategy, recorded", [
    (None, {"name": "ke"}), (LaterLayers(), {"name": "llf", "start": "3"}),
    (ShrinkPerturb(), {"name": "shrink-perturb", "shrink": 0.4, "perturb": 0.1}), (WarmRestart(), {"name": "none"})])
def test_every_strategy_runs_the_loop_is_recorded_and_the_fit_is_measured_every_generation(strategy, recorded,
                                                                                           tmp_path):
    loop = small_run(strategy, run_dir=tmp_path, generations=2, epochs=1)
    history = loop.run()
    assert loop.run_config.forget == recorded
    assert RunDirectory(tmp_path).read_config().forget == recorded
    assert from_settings(recorded) == loop.forgetting  # LLF's default start resolved for this model
    assert [record.generation for record in history] == [1, 2] and all(0 <= record.fit <= 1 for record in history)
    assert RunDirectory(tmp_path).fit_file.is_file()


@pytest.mark.parametrize("strategy", [LaterLayers(), ShrinkPerturb(), WarmRestart()])
def test_a_resumed_run_ends_bit_for_bit_where_an_uninterrupted_one_does(strategy, tmp_path, terminal_sigint):
    reference = small_run(strategy)
    history = reference.run()

    class StopInTheFirstGeneration(kecompress.Callback):
        steps = 0

        def on_step_end(self, loop, loss, samples):
            self.steps += 1
            if self.steps == 7:  # of 5 an epoch: the next forgetting comes after the resume
                loop.request_stop()

    with pytest.raises(RunInterrupted):
        small_run(strategy, run_dir=tmp_path, callbacks=[StopInTheFirstGeneration()]).run()
    resumed = small_run(strategy, run_dir=tmp_path).resume()
    strip = lambda records: [dataclasses.replace(record, seconds=None) for record in records]  # noqa: E731
    assert strip(resumed.run()) == strip(history)
    assert_same(resumed.model, reference.model)


def test_a_python_run_is_resumed_with_its_own_strategy_only(tmp_path):
    small_run(LaterLayers(), run_dir=tmp_path, generations=1, epochs=1).run()
    with pytest.raises(KecompressError, match="differs in forget"):
        small_run(ShrinkPerturb(), run_dir=tmp_path, generations=1, epochs=1).resume()
    small_run(LaterLayers("3"), run_dir=tmp_path, generations=1, epochs=1).resume()  # the default, named


def test_the_command_line_records_the_strategy_and_refuses_to_resume_with_another(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    shutil.copy(LANDED / "tiny.pt", "tiny.pt")
    assert main([*TINY, "--forget", "shrink-perturb", "--perturb", "0.2", "--out", "sp"]) == 0
    assert json.loads(Path("sp/config.json").read_text())["forget"] == \
        {"name": "shrink-perturb", "shrink": 0.4, "perturb": 0.2}
    assert main(["report", "sp"]) == 0
    assert "forgetting shrink-perturb (shrink 0.4, perturb 0.2)" in capsys.readouterr().out
    for other in (["--forget", "shrink-perturb"], ["--forget", "ke"], ["--forget", "llf"]):
        assert main([*TINY, *other, "--out", "sp", "--resume"]) == 2
        err = capsys.readouterr().err
        assert "differs in forget" in err and len(err.splitlines()) == 1, err
    assert main([*TINY, "--forget", "llf", "--out", "llf"]) == 0  # the default start of a model file
    assert RunDirectory("llf").read_config().forget == {"name": "llf", "start": "4"}
    assert main([*TINY, "--forget", "llf", "--forget-from", "4", "--out", "llf", "--resume"]) == 0


def test_a_run_of_an_earlier_version_reads_as_kes_reset(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    shutil.copy(LANDED / "tiny.pt", "tiny.pt")
    shutil.copytree(LANDED / "landed_cli_run", "landed")
    assert RunDirectory("landed").read_config().forget == {"name": "ke"}
    landed = ["evolve", "tiny.pt", "--image-size", "12", "--generations", "2", "--epochs", "2", "--batch-size", "256",
              "--lr", "0.05", "--seed", "3", "--out", "landed", "--resume"]
    assert main([*landed, "--forget", "none"]) == 2
    assert "differs in forget" in capsys.readouterr().err
    # a Python run of that version wrote no config.json: its checkpoint is compared, and it ran KE's reset
    shutil.copytree(LANDED / "landed_python_run", "python")
    python_run = small_run(WarmRestart())
    with pytest.raises(KecompressError, match="differs in forget"):
        RunDirectory("python").check_same_run(python_run.run_config, python_run.model)


def test_settings_round_trip_through_the_run_configuration():
    for strategy in (ResetHypothesis(), LaterLayers("layer4"), ShrinkPerturb(0.6, 0.05), WarmRestart()):
        assert from_settings(settings_of(strategy)) == strategy
    with pytest.raises(KecompressError, match="unknown forgetting strategy 'python'"):
        from_settings({"name": "python", "class": "my.Strategy"})
