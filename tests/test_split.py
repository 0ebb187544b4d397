import math

import pytest
import torch
import torch.nn as nn

import kecompress
from kecompress import KecompressError, Split
from kecompress.split import fit_channels

from conftest import build, example_input


def kels(name, rate=0.5):
    model = build(name)
    return model, kecompress.split(model, "kels", rate, example_inputs=example_input(name))


def test_kels_resnet18_follows_the_layer_rules():
    model, s = kels("resnet18")
    m = s.masks
    # Input layer: first half of the filters, all three RGB input channels.
    assert m["conv1.weight"][:32].all() and not m["conv1.weight"][32:].any()
    # An inner conv: first ceil(rate*C_out) filters and inside them first ceil(rate*C_in) kernels.
    w = m["layer2.0.conv2.weight"]
    assert w.shape == (128, 128, 3, 3)
    assert w[:64, :64].all() and not w[64:].any() and not w[:, 64:].any()
    # Normalisation layers keep their first ceil(rate*C) channels.
    assert m["bn1.weight"][:32].all() and not m["bn1.weight"][32:].any()
    assert torch.equal(m["layer3.1.bn2.bias"], m["layer3.1.bn2.weight"])
    # Output layer: all logits and their biases, half of its inputs.
    assert m["fc.weight"][:, :256].all() and not m["fc.weight"][:, 256:].any()
    assert m["fc.bias"].all()
    # Every parameter of the model is covered.
    assert set(m) == {name for name, _ in model.named_parameters()}


def test_kels_keeps_residual_channels_consistent():
    _, s = kels("resnet18")
    # conv1, layer1's second convs (added to the identity) and the next block's input agree.
    kept = s.masks["bn1.weight"]
    for name in ["layer1.0.bn2.weight", "layer1.1.bn2.weight"]:
        assert torch.equal(s.masks[name], kept)
    assert torch.equal(s.masks["layer2.0.conv1.weight"][0, :, 0, 0], kept)
    assert torch.equal(s.masks["layer2.0.downsample.0.weight"][0, :, 0, 0], kept)


def test_kels_splits_a_concatenation_per_segment():
    _, s = kels("densenet121")
    # denselayer2 reads cat(64 stem channels, 32 from denselayer1): first 32 and first 16 of each.
    inputs = s.masks["features.denseblock1.denselayer2.norm1.weight"]
    assert inputs.shape == (96,)
    expected = torch.zeros(96, dtype=torch.bool)
    expected[:32] = True
    expected[64:80] = True
    assert torch.equal(inputs, expected)


def test_kels_follows_a_flatten_into_the_classifier():
    _, s = kels("vgg11_bn")
    columns = s.masks["classifier.0.weight"][0]  # 512 channels x 7 x 7 positions
    assert columns.shape == (25088,)
    assert columns[: 256 * 49].all() and not columns[256 * 49:].any()


def test_kels_depthwise_conv_follows_its_input_channels():
    _, s = kels("mobilenet_v2")
    depthwise = s.masks["features.1.conv.0.0.weight"]  # Conv2d(32, 32, groups=32)
    assert depthwise.shape == (32, 1, 3, 3)
    assert depthwise[:16].all() and not depthwise[16:].any()
    assert torch.equal(s.masks["features.0.1.weight"], depthwise[:, 0, 0, 0])


def test_kels_narrow_grouped_conv_keeps_the_same_count_in_every_group():
    model = build("regnet_x_400mf")
    s = kecompress.split(model, "kels", 0.5, example_inputs=example_input("regnet_x_400mf"), grouped="narrow")
    assert s.grouped == "narrow"
    conv = model.get_submodule("trunk_output.block1.block1-0.f.b.0")
    assert 1 < conv.groups < conv.out_channels
    per_group = conv.out_channels // conv.groups
    mask = s.masks["trunk_output.block1.block1-0.f.b.0.weight"][:, :, 0, 0]
    kept_out = mask.any(dim=1).view(conv.groups, per_group)
    assert (kept_out.sum(dim=1) == math.ceil(0.5 * per_group)).all()  # same count in every group
    kept_in = mask.any(dim=0)
    assert kept_in.sum() == math.ceil(0.5 * per_group)


@pytest.mark.parametrize("name, layer, rate, align, kept_groups", [
    ("regnet_x_400mf", "trunk_output.block2.block2-0.f.b.0", 0.5, 1, 2),  # 64 channels, 4 groups of 16
    ("regnet_x_400mf", "trunk_output.block2.block2-0.f.b.0", 0.3, 1, 2),  # ceil(0.3 * 4)
    ("regnet_y_400mf", "trunk_output.block2.block2-0.f.b.0", 0.5, 1, 7),  # 104 channels, 13 groups of 8
    ("regnet_y_400mf", "trunk_output.block2.block2-0.f.b.0", 0.5, 16, 8),  # 7 groups aligned up to 2 x 8 = 16
    ("resnext50_32x4d", "layer1.0.conv2", 0.5, 1, 16),  # 128 channels, 32 groups of 4
    ("resnext50_32x4d", "layer1.0.conv2", 0.25, 16, 8),  # 32 groups of 4: ceil(0.25 * 32) = 8 = 2 x 4 groups
])
def test_kels_grouped_conv_keeps_whole_groups_by_default(name, layer, rate, align, kept_groups):
    model = build(name)
    s = kecompress.split(model, "kels", rate, example_inputs=example_input(name), align=align)
    assert s.grouped == "whole-groups"
    conv = model.get_submodule(layer)
    width = conv.out_channels // conv.groups
    mask = s.masks[f"{layer}.weight"]
    # The first kept_groups groups, every filter and every input channel of each; none of the others.
    assert mask[:kept_groups * width].all() and not mask[kept_groups * width:].any()
    # The coupled layers follow: the producing layer's outputs and the consuming layer's inputs.
    producer = s.masks[layer.rsplit(".", 2)[0] + ".a.0.weight"] if "regnet" in name else s.masks[layer[:-1] + "1.weight"]
    consumer = s.masks[layer.rsplit(".", 2)[0] + ".c.0.weight"] if "regnet" in name else s.masks[layer[:-1] + "3.weight"]
    expected = torch.arange(conv.in_channels) < kept_groups * width
    assert torch.equal(producer.flatten(1).any(dim=1), expected)
    assert torch.equal(consumer.transpose(0, 1).flatten(1).any(dim=1), expected)


def test_a_split_saved_before_grouped_existed_loads_as_narrow(tmp_path):
    model = build("regnet_x_400mf")
    s = kecompress.split(model, "kels", 0.5, example_inputs=example_input("regnet_x_400mf"), grouped="narrow")
    state = s.to_dict()
    del state["grouped"]
    torch.save(state, tmp_path / "split.pt")
    old = Split.load(tmp_path / "split.pt")
    assert old.grouped == "narrow"
    x = example_input("regnet_x_400mf")
    fit = kecompress.slice_fit(model, old, example_inputs=x)
    assert fit.get_submodule("trunk_output.block2.block2-0.f.b.0").groups == 4  # every group, each narrowed
    assert Split.load(tmp_path / "split.pt").to_dict()["grouped"] == "narrow"


def test_an_unknown_grouped_rule_is_refused():
    with pytest.raises(KecompressError, match="grouped must be one of whole-groups, narrow"):
        kecompress.split(build("resnet18"), "kels", 0.5, grouped="wide")


# Rate 0.5 on every architecture is checked with the slicing test (tests/test_slim.py).
@pytest.mark.parametrize("name, rate", [("resnet18", 0.25), ("mobilenet_v2", 0.75), ("regnet_x_400mf", 0.3)])
def test_kels_fit_fraction_is_close_to_rate_squared(name, rate):
    model = build(name)
    # Whole groups keep a rate share of a grouped conv's weights, not rate²: the narrow rule is the paper's.
    s = kecompress.split(model, "kels", rate, example_inputs=example_input(name), grouped="narrow")
    # Rounding up and the whole logits layer only ever add to rate**2.
    assert rate ** 2 - 0.005 <= s.fit_fraction() <= 1.4 * rate ** 2
    for param_name, param in model.named_parameters():
        assert s.masks[param_name].shape == param.shape
        assert s.masks[param_name].dtype == torch.bool


def test_rate_one_puts_everything_in_the_fit():
    for method in ("kels", "wels"):
        model = build("resnet18")
        s = kecompress.split(model, method, 1.0, example_inputs=example_input("resnet18"))
        assert s.fit_fraction() == 1.0


def test_wels_is_a_seeded_bernoulli_draw_per_weight():
    model = build("resnet18")
    a = kecompress.split(model, "wels", 0.3, seed=7)
    b = kecompress.split(model, "wels", 0.3, seed=7)
    c = kecompress.split(model, "wels", 0.3, seed=8)
    assert a.masks.keys() == b.masks.keys()
    assert all(torch.equal(a.masks[k], b.masks[k]) for k in a.masks)
    assert not all(torch.equal(a.masks[k], c.masks[k]) for k in a.masks)
    assert a.fit_fraction() == pytest.approx(0.3, abs=0.01)
    # Every conv and linear weight is covered.
    layers = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert set(a.masks) == {f"{n}.weight" for n in layers}


@pytest.mark.parametrize("rate", [0, -0.1, 1.5, float("nan"), "half", None])
def test_bad_rate_is_refused(rate):
    with pytest.raises(KecompressError, match="rate"):
        kecompress.split(nn.Linear(2, 2), "wels", rate)


def test_unknown_method_is_refused():
    with pytest.raises(KecompressError, match="kels.*wels"):
        kecompress.split(nn.Linear(2, 2), "random", 0.5)


class OwnConv(nn.Module):
    """A layer with a weight outside the standard layers: KELS cannot know its channels."""

    def __init__(self):
        super().__init__()
        self.kernel = nn.Parameter(torch.randn(8, 3, 3, 3))

    def forward(self, x):
        return nn.functional.conv2d(x, self.kernel)


def test_a_layer_kels_cannot_split_is_named():
    model = nn.Sequential(OwnConv(), nn.ReLU(), nn.Conv2d(8, 4, 1))
    with pytest.raises(KecompressError, match=r"'0' \(OwnConv\).*kernel.*WELS"):
        kecompress.split(model, "kels", 0.5, example_inputs=torch.randn(1, 3, 8, 8))


class HandWrittenAttention(nn.Module):
    """Multi-head self-attention of one's own: the qkv outputs are reshaped into heads."""

    def __init__(self, dim=16, heads=2):
        super().__init__()
        self.qkv, self.proj, self.heads = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim), heads

    def forward(self, x):
        batch, tokens, dim = x.shape
        q, k, v = self.qkv(x).reshape(batch, tokens, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        x = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(batch, tokens, dim))


def test_attention_heads_kels_cannot_keep_consistent_are_refused():
    # The rate rule alone would keep every query, half of the keys and no value.
    model = nn.Sequential(nn.Linear(8, 16), HandWrittenAttention(), nn.Flatten(), nn.Linear(5 * 16, 3))
    with pytest.raises(KecompressError, match=r"layer '1.qkv' meet as attention heads.*WELS"):
        kecompress.split(model, "kels", 0.5, example_inputs=torch.randn(1, 5, 8))


def test_a_model_the_graph_cannot_trace_gets_an_error():
    model = build("shufflenet_v2_x0_5")  # channel shuffle defeats the dependency graph
    with pytest.raises(KecompressError, match="dependency graph"):
        kecompress.split(model, "kels", 0.5, example_inputs=torch.randn(1, 3, 64, 64))


def test_split_does_not_change_the_model():
    model = build("resnet18").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kecompress.split(model, "kels", 0.5, example_inputs=example_input("resnet18"))
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_split_round_trips_through_a_file(tmp_path):
    model, s = kels("mobilenet_v3_small")
    s.save(tmp_path / "split.pt")
    loaded = Split.load(tmp_path / "split.pt")
    assert (loaded.method, loaded.rate, loaded.seed) == (s.method, s.rate, s.seed)
    assert all(torch.equal(loaded.masks[k], s.masks[k]) for k in s.masks)
    loaded.check_matches(model)
    with pytest.raises(KecompressError, match="another model"):
        loaded.check_matches(build("resnet18"))


def test_fit_channels_blocks():
    assert fit_channels(5, 0.5) == {0, 1, 2}
    assert fit_channels(12, 0.25, blocks=3) == {0, 4, 8}


def test_fit_channels_aligned():
    assert fit_channels(24, 0.5, align=8) == set(range(16))  # 12 rounded up to 16
    assert fit_channels(32, 0.5, align=16) == set(range(16))  # already a multiple
    assert fit_channels(8, 0.25, align=16) == set(range(8))  # never more than the group has
    assert fit_channels(48, 0.5, blocks=2, align=16) == set(range(16)) | set(range(24, 40))  # whole groups, 32 in all


@pytest.mark.parametrize("align", [0, -8, 2.5, "8", True, None])
def test_bad_align_is_refused(align):
    with pytest.raises(KecompressError, match="align must be a whole number"):
        kecompress.split(nn.Linear(2, 2), "kels", 0.5, example_inputs=torch.randn(1, 2), align=align)


def test_align_with_wels_is_refused():
    with pytest.raises(KecompressError, match="align 8 applies to KELS"):
        kecompress.split(nn.Linear(2, 2), "wels", 0.5, align=8)


def test_align_round_trips_and_old_split_files_read_as_one(tmp_path):
    model = build("resnet18")
    s = kecompress.split(model, "kels", 0.5, example_inputs=example_input("resnet18"), align=16)
    s.save(tmp_path / "split.pt")
    assert Split.load(tmp_path / "split.pt").align == 16
    old = s.to_dict()
    del old["align"]  # as written before align existed
    assert Split.from_dict(old).align == 1
