"""Measuring a network: eval mode, accuracy, mean loss and metric over a loader, parameters."""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from . import distributed
from .acceleration import MixedPrecision


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Context manager: every submodule in eval mode inside, each back in its own mode after.

    Unlike ``model.train(was_training)``, this restores mixed modes (a frozen BatchNorm in
    eval inside a training model stays in eval).

    Example:
        >>> model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2).eval())
        >>> with eval_mode(model):
        ...     model.training
        False
        >>> model.training, model[1].training
        (True, False)
    """
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


def accuracy(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    """Top-1 accuracy of a batch of logits, as a fraction in [0, 1].

    Example:
        >>> accuracy(torch.tensor([[2.0, 1.0], [0.0, 3.0]]), torch.tensor([0, 0]))
        0.5
    """
    return (outputs.argmax(dim=1) == targets).float().mean().item()


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, loss_fn: Callable, metric_fn: Callable = accuracy,
             device: torch.device | str = "cpu", precision: str = "fp32",
             across_ranks: bool = False) -> tuple[float, float]:
    """Mean loss and mean metric of ``model`` over ``loader``, in eval mode (then restored).

    Args:
        precision: ``"fp32"``, or ``"bf16"`` / ``"fp16"`` to run under autocast.
        across_ranks: under torchrun, sum the losses, metrics and counts of every rank's
            ``loader`` (each rank holding a part of the data, every rank must call it), so that
            every rank returns the means over all the data.

    Example:
        >>> data = [(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))]
        >>> loss, acc = evaluate(nn.Linear(3, 2), data, nn.CrossEntropyLoss(), accuracy)
        >>> 0.0 <= acc <= 1.0
        True
    """
    amp = MixedPrecision(precision, device)
    total_loss = total_metric = count = 0.0
    with eval_mode(model):
        for inputs, targets in loader:
            inputs, targets = inputs.to(device), targets.to(device)
            with amp.autocast():
                outputs = model(inputs)
                loss = loss_fn(outputs, targets)
            batch = len(inputs)
            total_loss += loss.item() * batch
            total_metric += metric_fn(outputs, targets) * batch
            count += batch
    if across_ranks:
        total_loss, total_metric, count = distributed.all_sum([total_loss, total_metric, count], device)
    return total_loss / max(count, 1), total_metric / max(count, 1)


def parameter_count(model: nn.Module) -> int:
    """Number of parameter entries of ``model``.

    Example:
        >>> parameter_count(nn.Linear(3, 2))
        8
    """
    return sum(param.numel() for param in model.parameters())
