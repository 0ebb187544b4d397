"""kecompress info: what a split does before any training, on real architectures and on runs."""

import json

import pytest
import torch

import kecompress
from kecompress.cli import main

from conftest import build


def info_json(capsys, *argv):
    status = main(["info", *map(str, argv), "--json"])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    return json.loads(captured.out)


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v3_small", "efficientnet_b0"])
def test_info_counts_what_the_sliced_fit_network_has(arch, capsys):
    info = info_json(capsys, arch, "--num-classes", "10", "--input-size", "32")
    model = build(arch)
    example = torch.zeros(1, 3, 32, 32)
    fit = kecompress.slice_fit(model, kecompress.split(model, "kels", 0.5, example_inputs=example), example_inputs=example)
    assert info["fit_parameters"] == sum(p.numel() for p in fit.parameters())
    assert info["dense_parameters"] == sum(p.numel() for p in model.parameters())
    assert info["fit_macs"] < info["dense_macs"] / 2 and info["coupled_groups"] > 0
    assert info["rate_squared"] == 0.25 and abs(info["fit_fraction"] - 0.25) < 0.1
    modules = dict(fit.named_modules())
    for layer in info["layers"]:  # every layer's kept channels are the sliced layer's channels
        weight = modules[layer["name"]].weight
        assert tuple(layer["fit"]) == tuple(weight.shape[:len(layer["fit"])]), layer["name"]


def test_info_of_a_run_names_its_configuration_and_last_generation(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["evolve", "resnet18", "--generations", "1", "--epochs", "1", "--image-size", "16",
                 "--batch-size", "256", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert "resnet18, KELS rate 0.5, on the digits demo" in printed and "generations: 1 of 1" in printed
    assert "last generation: 1: dense accuracy" in printed and "rate² = 25.0%" in printed


@pytest.mark.parametrize("argv, message", [(["no_such_net"], "unknown"), (["resnet18", "--rate", "0"], "--rate"),
                                           (["shufflenet_v2_x0_5"], "dependency graph")])
def test_info_refuses_bad_input_in_one_line(argv, message, capsys):
    status = main(["info", *argv])
    err = capsys.readouterr().err
    assert status == 2 and message in err and len(err.splitlines()) == 1, err


# 64 channels in 4 groups of 16: 2 whole groups (32 outputs, each group reading 16), or 4 groups of 8 (reading 8).
@pytest.mark.parametrize("grouped, fit", [("whole-groups", (32, 16)), ("narrow", (32, 8))])
def test_info_shows_how_grouped_convolutions_are_cut(grouped, fit, capsys):
    argv = ["regnet_x_400mf", "--num-classes", "10", "--input-size", "32", "--grouped", grouped]
    info = info_json(capsys, *argv)
    assert info["grouped"] == grouped
    layer = next(layer for layer in info["layers"] if layer["name"] == "trunk_output.block2.block2-0.f.b.0")
    assert tuple(layer["fit"]) == fit
    assert main(["info", *argv]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert f"grouped convolutions: {grouped} (" in printed


def test_info_says_nothing_of_grouped_convolutions_a_model_does_not_have(capsys):
    assert main(["info", "resnet18", "--num-classes", "10", "--input-size", "32"]) == 0
    assert "grouped convolutions" not in capsys.readouterr().out
    assert info_json(capsys, "resnet18", "--num-classes", "10", "--input-size", "32")["grouped"] is None


def test_info_refuses_an_unknown_grouped_rule_in_one_line(capsys):
    status = main(["info", "regnet_x_400mf", "--grouped", "wide"])
    err = capsys.readouterr().err
    assert status == 2 and "whole-groups" in err and len(err.splitlines()) == 1, err
