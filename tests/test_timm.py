"""timm models: ``timm:NAME`` wherever an architecture name is accepted, and KELS on timm's families.

BatchNorm families (a ResNet-D, MobileNetV3, EfficientNet) slice to exactly the masked dense
network. LayerNorm families (ConvNeXt, a vision transformer) cannot (docs/concepts.md): there the
split's consistency is checked with every LayerNorm replaced by an identity, which must then
slice to exactly the masked network, and the difference LayerNorm makes is measured.
"""

import json
import sys

import pytest
import torch
import torch.nn as nn

import kecompress
from kecompress.cli import main
from kecompress.config import RunConfig
from kecompress.models import build_model, resolve_model
from kecompress.rundir import RunDirectory, load_fit, save_fit

from conftest import error, randomise_batchnorm, zero_reset_hypothesis

timm = pytest.importorskip("timm")

SIZE = 32


def create(name, **options):
    return timm.create_model(name, pretrained=False, num_classes=10, **options)


def without_layernorm(model):
    """``model`` with every LayerNorm (timm's LayerNorm2d included) replaced by an identity."""
    for module in list(model.modules()):
        for name, child in module.named_children():
            if isinstance(child, nn.LayerNorm):
                setattr(module, name, nn.Identity())
    return model


def sliced_and_masked(model, rate=0.5):
    """The outputs of the sliced fit network and of the masked dense network, the split and the fit."""
    x = torch.randn(2, 3, SIZE, SIZE)
    split = kecompress.split(model, "kels", rate, example_inputs=x[:1])
    fit = kecompress.slice_fit(model, split, example_inputs=x[:1])
    with torch.no_grad():
        return fit(x), zero_reset_hypothesis(model, split)(x), split, fit


def relative_difference(got, expected):
    return ((got - expected).abs().max() / expected.abs().max()).item()


# -- timm:NAME -------------------------------------------------------------------------------

def test_a_timm_name_builds_an_untrained_model_for_the_classes(monkeypatch):
    calls = []
    create_model = timm.create_model
    monkeypatch.setattr(timm, "create_model",
                        lambda *args, **kwargs: calls.append(kwargs) or create_model(*args, **kwargs))
    model = build_model("timm:resnet10t", num_classes=7)
    assert calls == [{"pretrained": False, "num_classes": 7}]  # never a download
    assert isinstance(model, timm.models.ResNet) and model.fc.out_features == 7
    assert resolve_model("timm:mobilenetv3_small_050", 3).classifier.out_features == 3
    # A vision transformer is built for one input size: the run's.
    assert build_model("timm:vit_tiny_patch16_224", 3, image_size=SIZE).patch_embed.img_size == (SIZE, SIZE)


def test_without_timm_the_error_is_one_line_with_the_install_command(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` now raises ImportError
    assert main(["info", "timm:resnet10t", "--input-size", "32"]) == 2
    err = capsys.readouterr().err
    assert err == "kecompress: timm:resnet10t needs timm, which is not installed: pip install 'kecompress[timm]'\n"


def test_an_unknown_timm_name_names_close_ones():
    assert "did you mean timm:resnet10t" in error(build_model, "timm:resnet10", 3)
    assert "timm:efficientnet_b0" in error(build_model, "timm:efficientnet_b", 3)
    assert "drop the tag, e.g. timm:resnet18d" in error(build_model, "timm:resnet18d.a1_in1k", 3)
    assert "names no model" in error(build_model, "timm:", 3)


# -- KELS on timm's families ----------------------------------------------------------------

@pytest.mark.parametrize("name", ["resnet10t", "mobilenetv3_small_050", "efficientnet_b0"])
def test_batchnorm_families_slice_to_the_masked_network(name):
    # resnet10t is a ResNet-D (average-pool shortcut, deep stem); the others have squeeze-excitation.
    got, expected, split, fit = sliced_and_masked(randomise_batchnorm(create(name)).eval())
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())
    assert sum(p.numel() for p in fit.parameters()) == split.fit_count()
    assert 0.25 <= split.fit_fraction() < 0.3


@pytest.mark.parametrize("options", [{}, {"conv_mlp": False}], ids=["conv-mlp", "linear-mlp"])
def test_convnext_layernorm_channels_are_cut_with_the_channels_they_normalise(options):
    model = create("convnext_atto", **options).eval()
    got, expected, split, fit = sliced_and_masked(model)
    assert fit.stem[1].normalized_shape == (20,) and fit.stages[3].blocks[0].norm.normalized_shape == (160,)
    assert torch.equal(split.masks["stages.1.blocks.0.gamma"], split.masks["stages.1.blocks.0.norm.weight"])
    assert sum(p.numel() for p in fit.parameters()) == split.fit_count()
    # LayerNorm counts the zeroed channels of the masked network in its statistics; the slim one does not.
    assert relative_difference(got, expected) > 0.05
    # Without it the split is exactly the masked network: every coupled channel was cut together.
    got, expected, _, _ = sliced_and_masked(without_layernorm(model))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())


def vit(**options):
    model = create("vit_tiny_patch16_224", img_size=SIZE, depth=2, **options).eval()
    with torch.no_grad():  # sharp attention, so that a wrong scale or a head cut wrong would show
        for block in model.blocks:
            block.attn.qkv.weight.mul_(8)
    return model


def test_vit_keeps_every_head_each_narrower_with_the_dense_scale():
    model = vit()
    got, expected, split, fit = sliced_and_masked(model)
    attention = fit.blocks[0].attn
    assert (attention.num_heads, attention.head_dim, attention.scale) == (3, 32, 64 ** -0.5)
    # Queries, keys and values of every head keep their first half of the head's 64 dimensions.
    kept = split.masks["blocks.0.attn.qkv.bias"].reshape(3, 3, 64)
    assert kept[..., :32].all() and not kept[..., 32:].any()
    assert fit.blocks[1].norm1.normalized_shape == (96,) and fit.cls_token.shape == (1, 1, 96)
    assert sum(p.numel() for p in fit.parameters()) == split.fit_count()
    assert relative_difference(got, expected) > 0.05  # LayerNorm, as in ConvNeXt
    got, expected, _, _ = sliced_and_masked(without_layernorm(model))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())


def test_attention_kels_cannot_keep_consistent_is_refused_naming_the_layer():
    assert "'blocks.0.attn' (Attention) is built with qk_norm" in error(
        kecompress.split, vit(qk_norm=True), "kels", 0.5, example_inputs=torch.zeros(1, 3, SIZE, SIZE))
    swin = create("swin_tiny_patch4_window7_224", depths=(1, 1, 1, 1))
    assert "'layers.0.blocks.0.attn' (WindowAttention) computes attention in 3 heads" in error(
        kecompress.split, swin, "kels", 0.5)


def test_timm_layers_slicing_cannot_follow_are_refused():
    x = torch.zeros(1, 3, SIZE, SIZE)
    # A weight-standardised conv's gain, which cutting the conv would leave whole.
    assert "'stem.conv' (ScaledStdConv2d) holds parameter 'gain'" in error(
        kecompress.split, create("nf_resnet26"), "kels", 0.5, example_inputs=x)
    # GhostNet's ghost modules slice their channels in a way the dependency graph does not follow.
    assert "KELS cannot split this model consistently" in error(
        kecompress.split, create("ghostnet_050"), "kels", 0.5, example_inputs=x)


# -- runs, files and the command line --------------------------------------------------------

def test_a_vit_fit_network_saves_and_reloads_at_the_run_image_size(tmp_path):
    config = RunConfig(model="timm:vit_tiny_patch16_224", num_classes=10, image_size=SIZE)
    dense = RunDirectory(tmp_path).build_dense(config).eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    split = kecompress.split(dense, "kels", 0.5, example_inputs=x[:1])
    fit = kecompress.slice_fit(dense, split, example_inputs=x[:1])
    save_fit(tmp_path / "fit.pt", fit, config, split, (3, SIZE, SIZE))
    with torch.no_grad():
        torch.testing.assert_close(load_fit(tmp_path / "fit.pt")(x), fit(x))


def test_evolve_a_timm_vit_on_small_images_then_resume_and_export_it(tmp_path, capsys):
    # timm's test_vit (a 300 k-parameter ViT) is built for 160 px: the run builds it for the demo's 32,
    # and resuming, loading fit.pt and exporting rebuild it at that size.
    out = tmp_path / "run"
    evolve = ["evolve", "timm:test_vit", "--generations", "2", "--epochs", "1", "--batch-size", "64", "--lr", "0.01",
              "--out", str(out)]
    assert main(evolve) == 0, capsys.readouterr().err
    config = json.loads((out / "config.json").read_text())
    assert (config["model"], config["arch"], config["image_size"]) == ("timm:test_vit", "timm:test_vit", SIZE)
    metrics = (out / "metrics.json").read_text()
    assert main(evolve + ["--resume"]) == 0 and (out / "metrics.json").read_text() == metrics
    assert main(["export", str(out), "--onnx"]) == 0, capsys.readouterr().err
    assert "timm:test_vit, KELS rate 0.5" in RunDirectory(out).title()
    import onnxruntime as ort
    session = ort.InferenceSession(str(out / "onnx" / "fit.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == [1, 3, SIZE, SIZE]
    capsys.readouterr()
    assert main(["info", str(out), "--input-size", "24"]) == 2  # not a whole number of its 16 px patches
    assert "cannot run on inputs of shape (3, 24, 24)" in capsys.readouterr().err


def test_info_of_an_untrained_timm_model(capsys):
    assert main(["info", "timm:test_vit", "--input-size", str(SIZE), "--num-classes", "10", "--json"]) == 0
    layers = {layer["name"]: layer for layer in json.loads(capsys.readouterr().out)["layers"]}
    assert (layers["blocks.0.attn.qkv"]["dense"], layers["blocks.0.attn.qkv"]["fit"]) == ([192, 64], [96, 32])
