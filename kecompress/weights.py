"""A pretrained start: a state dict (or a checkpoint holding one) loaded into a model before the split.

Read with ``torch.load(weights_only=True)``, so loading it runs no code from the file. A
classifier whose size differs from the data's classes is re-initialised, with a note
(:class:`WeightsNote`, a warning the command line prints as one line); any other key that is
missing, unexpected or of another shape is an error naming a few of them.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn as nn

from .errors import KecompressError

# Where checkpoints of common training scripts keep the state dict.
_STATE_DICT_KEYS = ("state_dict", "model", "model_state_dict", "net")


class WeightsNote(UserWarning):
    """What loading weights changed that a user should know of (a re-initialised classifier)."""


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load the weights in ``path`` into ``model`` in place, re-initialising a classifier of
    another size; returns ``model``.

    Example:
        >>> import os, tempfile, warnings
        >>> path = os.path.join(tempfile.mkdtemp(), "w.pt")
        >>> torch.save(nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 5)).state_dict(), path)
        >>> with warnings.catch_warnings(record=True) as notes:
        ...     warnings.simplefilter("always")
        ...     model = load_weights(nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 3)), path)
        >>> str(notes[0].message)
        'the classifier 1 has 3 outputs, the weights 5: it starts re-initialised'
    """
    state = _read_state_dict(Path(path))
    own = model.state_dict()
    other_shape = sorted(key for key in state.keys() & own.keys() if state[key].shape != own[key].shape)
    classifier = _classifier_name(model)
    if other_shape and all(key.rsplit(".", 1)[0] == classifier for key in other_shape):
        weight = state[f"{classifier}.weight"] if f"{classifier}.weight" in state else None
        warnings.warn(f"the classifier {classifier} has {own[f'{classifier}.weight'].shape[0]} outputs, the weights "
                      f"{'?' if weight is None else weight.shape[0]}: it starts re-initialised", WeightsNote,
                      stacklevel=2)
        state = {key: value for key, value in state.items() if key not in other_shape}
        own_kept = {key for key in own if key not in other_shape}
    else:
        own_kept = set(own)
    problems = [(what, sorted(keys)) for what, keys in (
        ("missing", own_kept - state.keys()), ("unexpected", state.keys() - own.keys()),
        ("of another shape", set(other_shape) & state.keys()))]
    problems = [(what, keys) for what, keys in problems if keys]
    if problems:
        listed = "; ".join(f"{len(keys)} {what} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"
                           for what, keys in problems)
        raise KecompressError(f"the weights in {path} do not fit the model: {listed}; pass weights saved from "
                              "this architecture")
    model.load_state_dict(state, strict=False)
    return model


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise KecompressError(f"weights file {path} does not exist: pass a state dict saved with "
                              "torch.save(model.state_dict())")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise KecompressError(f"cannot read weights {path} as a state dict ({reason[:200]}): save them with "
                              "torch.save(model.state_dict())") from None
    for key in _STATE_DICT_KEYS:  # a training checkpoint: the state dict inside it
        if isinstance(loaded, dict) and isinstance(loaded.get(key), dict):
            loaded = loaded[key]
            break
    if not isinstance(loaded, dict) or not loaded or not all(isinstance(value, torch.Tensor) for value in loaded.values()):
        raise KecompressError(f"{path} holds no state dict (names to tensors): save the weights with "
                              "torch.save(model.state_dict())")
    # Saved from DistributedDataParallel or torch.compile: the bare model's names.
    return {key.removeprefix("module.").removeprefix("_orig_mod."): value for key, value in loaded.items()}


def _classifier_name(model: nn.Module) -> str | None:
    """The last linear layer (or 1x1 convolution) in definition order: a classifier's output layer."""
    last = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) or isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1):
            last = name
    return last
