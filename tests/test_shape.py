"""Learned KELS fits (kecompress.shape): channels chosen by importance, global widths to a MAC
budget, chosen during a run and resumed, and that shape trained from scratch."""


import pytest
import torch
import torch.nn as nn

import kecompress
from kecompress.bench import count_macs_params
from kecompress.cli import main
from kecompress.interrupt import RunInterrupted
from kecompress.rundir import RunDirectory
from kecompress.shape import Selection, learned_split
from kecompress.split import groups_from_masks, trace_dependency_graph

from conftest import StopAtStep, build, error, randomise_batchnorm, small_evolution, strip, zero_reset_hypothesis

FAST = ["--generations", "2", "--epochs", "1", "--batch-size", "64"]


def small_bn_net():
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2))


def kept_hidden(split):
    return split.masks["0.bias"].nonzero().flatten().tolist()


def test_bn_scale_keeps_the_channels_with_the_largest_absolute_scales():
    model = small_bn_net()
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([0.1, -2.0, 0.3, 1.5, -0.05, 0.9]))
    split = learned_split(model, 0.5, select="bn-scale", example_inputs=torch.zeros(2, 4))
    assert kept_hidden(split) == [1, 3, 5]
    assert split.select == "bn-scale" and split.widths == "uniform"


def test_magnitude_keeps_the_channels_with_the_largest_group_norm():
    model = small_bn_net()
    with torch.no_grad():
        for module in (model[0], model[1], model[3]):
            module.weight.fill_(0.01)
        model[0].weight[[2, 4]] = 3.0  # channels 2 and 4 dominate the group's L2 norm
        model[0].bias.zero_()
        model[1].bias.zero_()
    split = learned_split(model, 0.33, select="magnitude", example_inputs=torch.zeros(2, 4))
    assert kept_hidden(split) == [2, 4]


def test_taylor_keeps_the_channels_whose_removal_costs_most_and_leaves_gradients_alone():
    model = small_bn_net().eval()
    with torch.no_grad():
        model[3].weight.zero_()
        model[3].weight[:, 5] = torch.tensor([3.0, -3.0])  # only channel 5 reaches the loss
    x, y = torch.randn(16, 4), torch.zeros(16, dtype=torch.long)
    split = learned_split(model, 0.16, select="taylor", example_inputs=x[:1], batches=[(x, y)])
    assert 5 in kept_hidden(split) and len(kept_hidden(split)) == 1
    assert all(param.grad is None for param in model.parameters())
    assert "batches" in error(learned_split, model, 0.5, select="taylor", example_inputs=x[:1])


def test_first_at_uniform_widths_is_the_papers_split():
    model = build("resnet18")
    x = torch.zeros(1, 3, 32, 32)
    learned = learned_split(model, 0.5, select="first", example_inputs=x, align=8)
    paper = kecompress.split(model, "kels", 0.5, example_inputs=x, align=8)
    assert all(torch.equal(learned.masks[name], paper.masks[name]) for name in paper.masks)


@pytest.mark.parametrize("name, fit_macs, align", [("resnet18", 0.3, 8), ("mobilenet_v2", 0.25, 8),
                                                    ("efficientnet_b0", None, 1)])
def test_global_widths_meet_the_budget_keep_aligned_groups_and_slice_to_the_masked_network(name, fit_macs, align):
    model = randomise_batchnorm(build(name)).eval()
    x = torch.randn(2, 3, 32, 32)
    split = learned_split(model, 0.5, select="bn-scale", widths="global", fit_macs=fit_macs, align=align,
                          example_inputs=x[:1])
    dense_macs = count_macs_params(model, (3, 32, 32))[0]
    uniform = kecompress.slice_fit(model, kecompress.split(model, "kels", 0.5, example_inputs=x[:1], align=align),
                                   example_inputs=x[:1])
    budget = fit_macs or count_macs_params(uniform, (3, 32, 32))[0] / dense_macs
    assert split.fit_macs == pytest.approx(budget)
    fit = kecompress.slice_fit(model, split, example_inputs=x[:1])
    assert abs(count_macs_params(fit, (3, 32, 32))[0] / dense_macs - budget) <= 0.02 * budget
    for group, kept in groups_from_masks(trace_dependency_graph(model, x[:1]), split.masks):
        assert len(kept) >= align and len(kept) % align == 0 or len(kept) == len(group.items[0].idxs)
    # Non-uniform: the widths follow the importances, not one rate.
    assert len({round(mask.float().mean().item(), 2) for mask in split.masks.values() if mask.dim() == 1}) > 2
    with torch.no_grad():
        torch.testing.assert_close(fit(x), zero_reset_hypothesis(model, split)(x), rtol=1e-4, atol=1e-4)


def test_a_budget_no_shape_meets_is_refused_in_one_line():
    model = build("resnet18")
    message = error(learned_split, model, 0.5, widths="global", fit_macs=0.001, align=8,
                    example_inputs=torch.zeros(1, 3, 32, 32))
    assert "no shape meets --fit-macs 0.001 at --align 8" in message
    assert "unknown selection" in error(learned_split, model, select="biggest")
    assert "(0, 1)" in error(learned_split, model, widths="global", fit_macs=1.2)


def test_the_split_records_how_it_was_chosen_and_old_splits_read_as_the_papers(tmp_path):
    model = nn.Sequential(nn.Linear(4, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 2))
    split = learned_split(model, 0.5, select="magnitude", widths="global", fit_macs=0.5, example_inputs=torch.zeros(1, 4))
    split.save(tmp_path / "split.pt")
    again = kecompress.Split.load(tmp_path / "split.pt")
    assert (again.select, again.widths, again.fit_macs) == ("magnitude", "global", 0.5)
    old = {key: value for key, value in split.to_dict().items() if key not in ("select", "widths", "fit_macs")}
    assert (kecompress.Split.from_dict(old).select, kecompress.Split.from_dict(old).widths) == ("first", "uniform")


@pytest.mark.parametrize("stop_at", [7, 13])  # inside generation 1 (before the choice) and 2 (after it)
def test_a_run_that_chooses_its_fit_resumes_bit_for_bit(tmp_path, stop_at):
    selection = Selection("bn-scale", "global", after=1, sparsity=1e-3)
    reference = small_evolution(generations=3, selection=selection)
    history = reference.run()
    assert reference.split.widths == "global"
    assert not all(torch.equal(mask, small_evolution().split.masks[name]) for name, mask in reference.split.masks.items())
    with pytest.raises(RunInterrupted):
        small_evolution(tmp_path, generations=3, selection=selection, callbacks=[StopAtStep(stop_at)]).run()
    resumed = small_evolution(tmp_path, generations=3, selection=selection).resume()
    assert strip(resumed.run()) == strip(history)
    assert all(torch.equal(mask, reference.split.masks[name]) for name, mask in resumed.split.masks.items())
    assert all(torch.equal(value, reference.model.state_dict()[key]) for key, value in resumed.model.state_dict().items())
    saved = RunDirectory(tmp_path).read_split()
    assert all(torch.equal(mask, reference.split.masks[name]) for name, mask in saved.masks.items())
    with pytest.raises(kecompress.KecompressError, match="differs in select"):
        small_evolution(tmp_path, generations=3, selection=Selection("magnitude", "global", sparsity=1e-3)).resume()


def test_sparsity_penalises_batchnorm_scales_until_the_choice():
    plain = small_evolution(generations=2, selection=Selection("bn-scale", "global", after=1))
    slimmed = small_evolution(generations=2, selection=Selection("bn-scale", "global", after=1, sparsity=0.05))
    plain.run(), slimmed.run()
    scales = [sum(module.weight.abs().sum().item() for module in loop.model.modules()
                  if isinstance(module, nn.BatchNorm2d)) for loop in (plain, slimmed)]
    assert scales[1] < scales[0]


def test_fit_only_shape_from_a_run_trains_that_shape_afresh_taught_by_it_and_refuses_another_model(tmp_path, capsys):
    ke, borrowed = tmp_path / "ke", tmp_path / "borrowed"
    assert main(["evolve", "mobilenet_v3_small", *FAST, "--select", "magnitude", "--widths", "global",
                 "--fit-macs", "0.3", "--out", str(ke)]) == 0
    assert main(["evolve", "mobilenet_v3_small", "--fit-only", "--generations", "1", "--epochs", "1",
                 "--batch-size", "64", "--shape-from", str(ke), "--distill-from-run", str(ke), "--out", str(borrowed)]) == 0
    assert RunDirectory(borrowed).read_config().distill_from_run == str(ke.resolve())
    dense, split, _ = RunDirectory(ke).load()
    fit = kecompress.slice_fit(dense, split, example_inputs=torch.zeros(1, 3, 32, 32))
    trained, _, _ = RunDirectory(borrowed).load()
    assert [p.shape for p in trained.parameters()] == [p.shape for p in fit.parameters()]
    assert not all(torch.equal(a, b) for a, b in zip(trained.parameters(), fit.parameters()))  # not inherited
    capsys.readouterr()
    assert main(["evolve", "resnet18", "--fit-only", "--shape-from", str(ke), "--out", str(tmp_path / "x")]) == 2
    assert "is a run of mobilenet_v3_small" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("argv, message", [
    (["--select", "biggest"], "Invalid value for '--select'"),
    (["--widths", "global", "--fit-macs", "1"], "Invalid value for '--fit-macs'"),
    (["--widths", "global", "--fit-macs", "0.001", "--align", "8"], "no shape meets --fit-macs 0.001"),
    (["--fit-macs", "0.3"], "--fit-macs sets the budget of --widths global"),
    (["--fit-only", "--widths", "global"], "pass --shape-epochs N"),
    (["--shape-from", "runs/x"], "pass --fit-only too"),
    (["--sparsity", "1e-4"], "--sparsity penalises BatchNorm scales"),
    (["--select", "bn-scale", "--select-after", "2"], "--select-after 2 leaves no generation"),
])
def test_bad_options_end_in_one_line_and_exit_2(tmp_path, capsys, argv, message):
    out = tmp_path / "run"
    assert main(["evolve", "resnet18", *FAST, *argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not out.exists() or not any(out.iterdir())


def test_from_weights_the_fit_is_chosen_before_the_first_generation(tmp_path):
    model = randomise_batchnorm(build("resnet18"))
    torch.save(model.state_dict(), tmp_path / "start.pt")
    out = tmp_path / "run"
    assert main(["evolve", "resnet18", "--generations", "1", "--epochs", "1", "--batch-size", "64", "--weights",
                 str(tmp_path / "start.pt"), "--select", "bn-scale", "--align", "8", "--out", str(out)]) == 0
    chosen = RunDirectory(out).read_split()
    expected = learned_split(model, 0.5, select="bn-scale", align=8, example_inputs=torch.zeros(1, 3, 32, 32))
    assert chosen.select == "bn-scale"
    assert all(torch.equal(chosen.masks[name], mask) for name, mask in expected.masks.items())


def test_info_shows_a_learned_fits_widths_and_the_uniform_fits_macs_beside_it(capsys):
    assert main(["info", "resnet18", "--num-classes", "10", "--input-size", "32", "--select", "magnitude",
                 "--widths", "global", "--fit-macs", "0.3", "--align", "8"]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert "channels chosen by magnitude, global widths: fit 30." in printed
    assert "the uniform fit at rate 0.5" in printed and "WELS" not in printed
