"""Where every random number of a run comes from, so that a resumed run draws the same ones.

Every epoch draws its shuffle, augmentation and dropout from a seed of its own, so a run resumed
at an epoch boundary replays what an uninterrupted run draws; the reset before a generation and
the fit network's BatchNorm re-estimation have seeds of their own. The formulas are those of
earlier versions, so that their runs resume bit for bit.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn as nn

_MODULUS = 2 ** 63


def epoch_seed(seed: int, generation: int, epoch: int) -> int:
    """The seed of one epoch (counted from 0) of one generation of a run seeded ``seed``.

    Example:
        >>> epoch_seed(0, 1, 0) != epoch_seed(0, 1, 1)
        True
    """
    return (seed * 1_000_003 + generation * 10_007 + epoch) % _MODULUS


def reset_seed(seed: int, generation: int) -> int:
    """The seed of the reset before ``generation`` (the slot of epoch -1, before its first epoch).

    Example:
        >>> reset_seed(0, 2) == epoch_seed(0, 2, -1)
        True
    """
    return epoch_seed(seed, generation, -1)


def batchnorm_seed(seed: int) -> int:
    """The seed of the fit network's BatchNorm re-estimation: one per run, so that the same
    weights always give the same fit network (the slot of generation 0, epoch -2).

    Example:
        >>> batchnorm_seed(0) == epoch_seed(0, 0, -2)
        True
    """
    return epoch_seed(seed, 0, -2)


@contextmanager
def drawing_from(seed: int | None, model: nn.Module) -> Iterator[None]:
    """Inside the block, torch draws from ``seed`` (or, when None, from its global generators as
    they are); afterwards the generators of the CPU and of the GPUs ``model`` is on are as they
    were, so a re-draw between generations leaves the data order and augmentation untouched.

    Example:
        >>> with drawing_from(5, torch.nn.Linear(2, 2)):
        ...     first = torch.rand(2)
        >>> with drawing_from(5, torch.nn.Linear(2, 2)):
        ...     bool(torch.equal(torch.rand(2), first))
        True
    """
    cuda_devices = sorted({param.device.index or 0 for param in model.parameters() if param.is_cuda})
    with torch.random.fork_rng(devices=cuda_devices):
        if seed is not None:
            torch.manual_seed(seed)
        yield


def rank_seed(seed: int, rank: int) -> int:
    """Each rank augments and drops out with its own numbers (rank 0 keeps the one-process seed);
    the odd 64-bit stride keeps the ranks' seeds far from every other epoch's.

    Example:
        >>> rank_seed(5, 0)
        5
    """
    return (seed + rank * 0x9E3779B97F4A7C15) % _MODULUS


def seed_loader(loader, seed: int) -> None:
    """Seed torch's global generator and ``loader``'s own (its shuffle) with ``seed``.

    Example:
        >>> loader = torch.utils.data.DataLoader(range(4), shuffle=True, generator=torch.Generator())
        >>> seed_loader(loader, 3); first = list(loader)
        >>> seed_loader(loader, 3); list(loader) == first
        True
    """
    torch.manual_seed(seed)
    generator = getattr(loader, "generator", None)
    if generator is not None:
        generator.manual_seed(seed)
