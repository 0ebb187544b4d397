"""Re-draw the reset hypothesis between generations, keeping the fit hypothesis bit for bit."""

from __future__ import annotations

import torch
import torch.nn as nn

from .seeds import drawing_from
from .split import Split


@torch.no_grad()
def reset_(model: nn.Module, split: Split, seed: int | None = None) -> nn.Module:
    """Re-initialise the reset hypothesis of ``model`` in place; the fit hypothesis is untouched.

    Every conv and linear layer that the split covers gets fresh values from its own default
    initialisation (``reset_parameters``: kaiming-uniform weights, uniform biases, as in the
    reference implementation) wherever its mask is False. Entries whose mask is True keep
    their exact values. Normalisation layers keep their statistics and affine parameters, as
    in the reference implementation; layers without a ``reset_parameters`` are left alone.

    Args:
        model: the model the split was made for, trained by the previous generation.
        split: a KELS or WELS :class:`~kecompress.Split` of ``model``.
        seed: draw the fresh values from this seed (reproducible), or from torch's global
            random generator when None.

    Returns:
        ``model``, for chaining.

    Example:
        >>> import kecompress
        >>> model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> s = kecompress.split(model, "kels", 0.5)
        >>> before = model[0].weight.clone()
        >>> _ = reset_(model, s, seed=1)
        >>> bool(torch.equal(model[0].weight[:4, :], before[:4, :]))  # the fit, bit for bit
        True
    """
    split.check_matches(model)
    with drawing_from(seed, model):
        for module_name, module in model.named_modules():
            if not isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
                continue
            masks = {name: split.masks.get(f"{module_name}.{name}" if module_name else name)
                     for name, _ in module.named_parameters(recurse=False)}
            if all(mask is None or bool(mask.all()) for mask in masks.values()):
                continue  # nothing of this layer is in the reset hypothesis
            kept = {name: param.detach().clone() for name, param in module.named_parameters(recurse=False)}
            module.reset_parameters()
            for name, param in module.named_parameters(recurse=False):
                mask = masks[name]
                fit = torch.ones_like(param, dtype=torch.bool) if mask is None else mask.to(param.device)
                param.copy_(torch.where(fit, kept[name], param))
    return model
