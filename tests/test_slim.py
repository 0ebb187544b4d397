import copy

import pytest
import torch
import torch.nn as nn

import kecompress
from kecompress import KecompressError
from kecompress.attention import qkv_heads
from kecompress.split import _channel_blocks, _mark_reset, kels_groups, trace_dependency_graph

from conftest import MORE_ARCHS, REQUIRED_ARCHS, build, example_input, randomise_batchnorm, zero_reset_hypothesis


@pytest.mark.parametrize("name", REQUIRED_ARCHS + MORE_ARCHS)
def test_sliced_network_equals_the_masked_dense_network(name):
    model = randomise_batchnorm(build(name)).eval()
    x = example_input(name, batch=2)
    s = kecompress.split(model, "kels", 0.5, example_inputs=x[:1])
    before = copy.deepcopy(model.state_dict())
    fit = kecompress.slice_fit(model, s, example_inputs=x[:1])
    with torch.no_grad():
        expected = zero_reset_hypothesis(model, s)(x)
        got = fit(x)
    assert got.shape == expected.shape == (2, 10)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())
    # The fit network really is smaller: exactly the split's fit parameters remain, about
    # rate**2 of them (rounding up and the whole logits layer only ever add to it).
    assert sum(p.numel() for p in fit.parameters()) == s.fit_count()
    assert 0.25 - 0.005 <= s.fit_fraction() <= 1.4 * 0.25
    # The original is untouched.
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_sliced_resnet18_has_the_slim_shapes():
    model = build("resnet18")
    x = example_input("resnet18")
    fit = kecompress.slice_fit(model, kecompress.split(model, "kels", 0.5, example_inputs=x), example_inputs=x)
    assert fit.conv1.in_channels == 3 and fit.conv1.out_channels == 32
    assert fit.layer4[1].conv2.out_channels == 256
    assert (fit.fc.in_features, fit.fc.out_features) == (256, 10)


def test_a_wels_split_cannot_be_sliced():
    model = build("resnet18")
    s = kecompress.split(model, "wels", 0.5)
    with pytest.raises(KecompressError, match="sparse, not slim.*KELS"):
        kecompress.slice_fit(model, s)


def test_a_split_of_another_model_is_refused():
    s = kecompress.split(build("resnet18"), "kels", 0.5, example_inputs=example_input("resnet18"))
    with pytest.raises(KecompressError, match="another model"):
        kecompress.slice_fit(build("resnet34"), s, example_inputs=example_input("resnet34"))


def test_layernorm_network_slices_but_differs_from_masking():
    # ConvNeXt-style LayerNorm over channels: zeroed channels change the statistics, so the
    # sliced network (the definition of the fit) cannot equal the masked dense one.
    model = nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.ReLU(), nn.Linear(32, 4)).eval()
    x = torch.randn(3, 16)
    s = kecompress.split(model, "kels", 0.5, example_inputs=x[:1])
    fit = kecompress.slice_fit(model, s, example_inputs=x[:1])
    assert fit[1].normalized_shape == (16,)
    with torch.no_grad():
        assert not torch.allclose(fit(x), zero_reset_hypothesis(model, s)(x), atol=1e-4)


def kept_out_channels(mask):
    return int(mask.movedim(0, 0).reshape(mask.shape[0], -1).any(dim=1).sum())


@pytest.mark.parametrize("align", [8, 16])
@pytest.mark.parametrize("name", REQUIRED_ARCHS)
def test_an_aligned_split_keeps_multiples_and_slices_to_the_masked_network(name, align):
    model = randomise_batchnorm(build(name)).eval()
    x = example_input(name, batch=2)
    s = kecompress.split(model, "kels", 0.5, example_inputs=x[:1], align=align)
    assert s.align == align
    graph = trace_dependency_graph(model, x[:1])
    for group, kept in kels_groups(graph, 0.5, align):
        channels = len(group.items[0].idxs)
        assert len(kept) % align == 0 or len(kept) == channels, group
    # Layer by layer too: every conv's and linear layer's kept outputs (the logits keep all).
    for layer_name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            kept = kept_out_channels(s.masks[f"{layer_name}.weight"])
            assert kept % align == 0 or kept == module.weight.shape[0], layer_name
    assert s.fit_fraction() >= kecompress.split(model, "kels", 0.5, example_inputs=x[:1]).fit_fraction()
    fit = kecompress.slice_fit(model, s, example_inputs=x[:1])
    with torch.no_grad():
        expected = zero_reset_hypothesis(model, s)(x)
        got = fit(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())
    assert sum(p.numel() for p in fit.parameters()) == s.fit_count()


def split_with_random_channels(model, example, seed=0):
    """A KELS split whose fit channels in every coupled group are chosen at random (as an
    importance criterion would), every layer of a group edited together."""
    generator = torch.Generator().manual_seed(seed)
    s = kecompress.split(model, "kels", 1.0, example_inputs=example)
    graph = trace_dependency_graph(model, example)
    name_of = {id(param): name for name, param in model.named_parameters()}
    heads = qkv_heads(model)
    for group, rule in kels_groups(graph, 0.5, grouped="narrow"):
        channels = len(group.items[0].idxs)
        blocks = _channel_blocks(graph, group, channels, heads)  # a grouped conv keeps the same offsets in every group
        size = channels // blocks
        offsets = torch.randperm(size, generator=generator)[:len(rule) // blocks].tolist()
        kept = {block * size + offset for block in range(blocks) for offset in offsets}
        for item in group.items:
            reset = [idx for idx, root in zip(item.idxs, item.root_idxs) if root not in kept]
            if reset:
                _mark_reset(graph, s.masks, name_of, item.dep, reset)
    return s


@pytest.mark.parametrize("name", REQUIRED_ARCHS)
def test_a_hand_edited_consistent_split_slices_to_exactly_its_channels(name):
    model = randomise_batchnorm(build(name)).eval()
    x = example_input(name, batch=2)
    s = split_with_random_channels(model, x[:1])
    rule = kecompress.split(model, "kels", 0.5, example_inputs=x[:1], grouped="narrow")
    assert s.fit_count() == rule.fit_count()
    assert any(not torch.equal(s.masks[key], rule.masks[key]) for key in s.masks)  # not the first channels
    fit = kecompress.slice_fit(model, s, example_inputs=x[:1])
    # Exactly the masked entries of every parameter, in order.
    dense = dict(model.named_parameters())
    for param_name, param in fit.named_parameters():
        assert torch.equal(param, dense[param_name][s.masks[param_name]].view(param.shape)), param_name
    with torch.no_grad():
        expected = zero_reset_hypothesis(model, s)(x)
        got = fit(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())


def test_a_mask_that_disagrees_with_its_coupled_layers_is_refused_naming_them():
    model = build("resnet18")
    x = example_input("resnet18")
    s = kecompress.split(model, "kels", 0.5, example_inputs=x)
    s.masks["conv1.weight"][3] = False  # a fit channel of conv1, left in bn1 and the next convs
    with pytest.raises(KecompressError, match=r"mask of 'conv1.weight' resets its output channels \[3\].*'bn1.bias'"):
        kecompress.slice_fit(model, s, example_inputs=x)
    s = kecompress.split(model, "kels", 0.5, example_inputs=x)
    s.masks["layer2.0.conv1.weight"][:64, 40:48] = True  # reset input channels, kept in one layer only
    with pytest.raises(KecompressError, match=r"'layer2.0.conv1.weight' keeps its input channels \[40, 41, 42, 43, 44, 45, 46, 47\]"):
        kecompress.slice_fit(model, s, example_inputs=x)


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["layer1.0.conv1.weight"][0, 0, 0].fill_(False), "'layer1.0.conv1.weight' does not keep whole channels"),
    (lambda m: m["conv1.weight"][:, 0].fill_(False), "'conv1.weight' resets entries that slicing cannot cut"),
    (lambda m: (m["fc.weight"][0].fill_(False), m["fc.bias"][0].fill_(False)), "output channels of layer 'fc'.*outputs"),
])
def test_masks_no_slim_network_computes_are_refused(edit, message):
    model = build("resnet18")
    x = example_input("resnet18")
    s = kecompress.split(model, "kels", 0.5, example_inputs=x)
    edit(s.masks)
    with pytest.raises(KecompressError, match=message):
        kecompress.slice_fit(model, s, example_inputs=x)


@pytest.mark.parametrize("grouped", ["whole-groups", "narrow"])
@pytest.mark.parametrize("name, layer", [("regnet_x_400mf", "trunk_output.block2.block2-0.f.b.0"),
                                         ("regnet_y_400mf", "trunk_output.block2.block2-0.f.b.0"),
                                         ("resnext50_32x4d", "layer1.0.conv2")])
def test_a_grouped_conv_slices_to_whole_or_narrowed_groups_and_equals_the_masked_network(name, layer, grouped):
    model = randomise_batchnorm(build(name)).eval()
    x = example_input(name, batch=2)
    s = kecompress.split(model, "kels", 0.5, example_inputs=x[:1], grouped=grouped)
    fit = kecompress.slice_fit(model, s, example_inputs=x[:1])
    dense, cut = model.get_submodule(layer), fit.get_submodule(layer)
    width = dense.out_channels // dense.groups
    if grouped == "whole-groups":  # half the groups (rounded up), each as wide as before
        assert (cut.groups, cut.out_channels // cut.groups) == (-(-dense.groups // 2), width)
    else:  # every group, each half as wide
        assert (cut.groups, cut.out_channels // cut.groups) == (dense.groups, -(-width // 2))
    with torch.no_grad():
        expected = zero_reset_hypothesis(model, s)(x)
        got = fit(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())
    assert sum(p.numel() for p in fit.parameters()) == s.fit_count()


@pytest.mark.parametrize("name, grouped", [("resnet50", "whole-groups"), ("mobilenet_v3_small", "whole-groups"),
                                           ("densenet121", "whole-groups"), ("resnext50_32x4d", "whole-groups"),
                                           ("regnet_y_400mf", "narrow")])
def test_the_weightless_shape_counts_the_same_macs_and_parameters_as_the_sliced_fit(name, grouped):
    from kecompress.bench import count_macs_params
    model = build(name)
    x = example_input(name)
    s = kecompress.split(model, "kels", 0.5, example_inputs=x, grouped=grouped)
    shape = kecompress.slim.slice_fit_shape(model, s, example_inputs=x)
    assert {p.device.type for p in shape.parameters()} == {"meta"}
    assert {p.device.type for p in model.parameters()} == {"cpu"}  # the model is left as it was
    assert count_macs_params(shape, tuple(x.shape[1:])) == \
        count_macs_params(kecompress.slice_fit(model, s, example_inputs=x), tuple(x.shape[1:]))


def test_the_weightless_shape_refuses_a_mask_slicing_cannot_cut():
    model = build("resnet18")
    x = example_input("resnet18")
    s = kecompress.split(model, "kels", 0.5, example_inputs=x)
    s.masks["conv1.weight"][:, 0] = False  # the model's input channel, in no coupled group
    with pytest.raises(KecompressError, match="'conv1.weight' resets entries that slicing cannot cut"):
        kecompress.slim.slice_fit_shape(model, s, example_inputs=x)
