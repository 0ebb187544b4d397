import copy

import pytest
import torch
import torch.nn as nn

import kecompress
from kecompress import KecompressError

from conftest import MORE_ARCHS, REQUIRED_ARCHS, build, example_input, randomise_batchnorm


def zero_reset_hypothesis(model, s):
    masked = copy.deepcopy(model)
    with torch.no_grad():
        for name, param in masked.named_parameters():
            param.mul_(s.masks[name])
    return masked


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
