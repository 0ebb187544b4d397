import math

import pytest
import torch
import torch.nn as nn

import kecompress
from kecompress import KecompressError

from conftest import build, example_input


@pytest.mark.parametrize("name, method", [("resnet18", "kels"), ("mobilenet_v3_small", "kels"),
                                          ("densenet121", "kels"), ("resnet18", "wels")])
def test_reset_keeps_the_fit_bit_for_bit_and_redraws_the_rest(name, method):
    model = build(name)
    s = kecompress.split(model, method, 0.5, example_inputs=example_input(name), seed=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kecompress.reset_(model, s, seed=11)
    params = dict(model.named_parameters())
    changed = 0
    for key, mask in s.masks.items():
        assert torch.equal(params[key][mask], before[key][mask]), key  # fit: identical bits
        owner = model.get_submodule(key.rsplit(".", 1)[0])
        if isinstance(owner, (nn.Conv2d, nn.Linear)) and (~mask).any():
            redrawn = params[key][~mask] != before[key][~mask]
            assert redrawn.float().mean() > 0.99, key
            changed += 1
        else:  # normalisation layers are kept, as in the reference implementation
            assert torch.equal(params[key], before[key]), key
    assert changed > 0
    for key, buffer in model.named_buffers():  # BatchNorm statistics are kept
        assert torch.equal(buffer, before[key])


def test_reset_draws_from_the_layers_default_initialisation():
    model = nn.Sequential(nn.Conv2d(64, 64, 3), nn.ReLU(), nn.Conv2d(64, 10, 1))
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(100.0)  # far outside any default initialisation
    s = kecompress.split(model, "kels", 0.5, example_inputs=torch.randn(1, 64, 8, 8))
    kecompress.reset_(model, s, seed=0)
    weight, mask = model[0].weight, s.masks["0.weight"]
    bound = 1 / math.sqrt(64 * 3 * 3)  # kaiming_uniform_(a=sqrt(5)) of reset_parameters
    assert weight[~mask].abs().max() <= bound
    assert (weight[mask] == 100.0).all()
    # The output layer keeps all its outputs, and its bias is never reset.
    assert (model[2].bias == 100.0).all()


def test_reset_with_a_seed_is_reproducible_and_without_one_follows_torch_rng():
    def reset(seed):
        model = build("resnet18")
        torch.manual_seed(0)
        model = build("resnet18")
        s = kecompress.split(model, "kels", 0.5, example_inputs=example_input("resnet18"))
        kecompress.reset_(model, s, seed=seed)
        return model.state_dict()

    a, b, c = reset(5), reset(5), reset(6)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_reset_refuses_a_split_of_another_model():
    s = kecompress.split(build("resnet18"), "wels", 0.5)
    with pytest.raises(KecompressError, match="another model"):
        kecompress.reset_(build("mobilenet_v2"), s)
