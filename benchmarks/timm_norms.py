"""How far the sliced KELS fit of a timm model is from the masked network, where normalisation
over channels (LayerNorm, GroupNorm, GRN) keeps them apart: docs/concepts.md's figures.

For each model, untrained, KELS at rate 0.5: the largest output difference between the fit cut
out (``kecompress.slice_fit``) and the dense network with its reset hypothesis zeroed, relative
to the largest output of the latter, on seeded random inputs.

    .venv/bin/python benchmarks/timm_norms.py          # a minute on 2 CPU cores
"""

from __future__ import annotations

import argparse
import sys

import torch

import kecompress
from common import run_script
from kecompress.models import build_model

MODELS = ["timm:convnext_atto", "timm:convnextv2_atto", "timm:vit_tiny_patch16_224", "timm:mobilevit_xxs",
          "timm:resnetv2_50x1_bit", "timm:resnet18d"]


def relative_difference(name: str, image_size: int) -> float:
    torch.manual_seed(0)
    model = build_model(name, 10, image_size).eval()
    inputs = torch.randn(4, 3, image_size, image_size)
    split = kecompress.split(model, "kels", 0.5, example_inputs=inputs[:1])
    sliced = kecompress.slice_fit(model, split, example_inputs=inputs[:1]).eval()
    with torch.no_grad():
        for name_, param in model.named_parameters():  # the masked network: the reset hypothesis zeroed
            param.mul_(split.masks[name_])
        masked = model(inputs)
        return float((sliced(inputs) - masked).abs().max() / masked.abs().max())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated timm:NAME models")
    parser.add_argument("--image-size", type=int, default=64)
    args = parser.parse_args(argv)
    for name in args.models.split(","):
        print(f"{name}: {relative_difference(name, args.image_size):.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_script("timm_norms", main))
