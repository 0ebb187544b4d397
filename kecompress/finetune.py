"""Fine-tuning the fit network after the last generation, with knowledge distillation from the
final dense network (Hinton et al., "Distilling the Knowledge in a Neural Network", 2015): the way
a pruned network is usually finished, at the fit's cost (a quarter of the MACs at rate 0.5, plus
the dense network's forward pass as the teacher)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from .acceleration import MixedPrecision
from .distillation import softened_kl
from .errors import KecompressError
from .interrupt import CtrlCGuard
from .training import TrainingStep


@dataclass(frozen=True)
class FitFinetuning:
    """``epochs`` epochs of the fit network alone, its loss ``kd_weight`` x the distillation term
    at ``temperature`` plus ``1 - kd_weight`` x the training loss on the labels; a new SGD
    optimizer with the run's learning rate, momentum, weight decay and cosine schedule.

    Example:
        >>> FitFinetuning(epochs=5).temperature
        4.0
    """

    epochs: int
    temperature: float = 4.0
    kd_weight: float = 0.5

    def __post_init__(self):
        if not isinstance(self.epochs, int) or self.epochs < 1:
            raise KecompressError(f"fine-tuning the fit takes 1 epoch or more, got {self.epochs}: e.g. --finetune-fit 10")
        if not self.temperature > 0 or not 0 <= self.kd_weight <= 1:
            raise KecompressError(f"fine-tuning needs a positive temperature and a distillation weight in [0, 1], "
                                  f"got {self.temperature} and {self.kd_weight}")

    def identity(self) -> dict:
        """The settings as a run's configuration records them."""
        return {"epochs": self.epochs, "temperature": self.temperature, "kd_weight": self.kd_weight}

    def loss(self, student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor, loss_fn: Callable):
        """The student's loss.

        Example:
            >>> logits = torch.tensor([[3.0, 0.0]])
            >>> float(FitFinetuning(1, kd_weight=1.0).loss(logits, logits, torch.tensor([0]), None))
            0.0
        """
        loss = self.kd_weight * softened_kl(student, teacher, self.temperature)
        return loss + (1 - self.kd_weight) * loss_fn(student, targets) if self.kd_weight < 1 else loss


class FinetuneStep(TrainingStep):
    """A training step of the fit network alone (``student``), the dense network (``teacher``,
    in eval mode, not trained) giving the soft targets.

    Example:
        >>> student, teacher = nn.Linear(3, 2), nn.Linear(3, 2).eval()
        >>> step = FinetuneStep(student, teacher, FitFinetuning(1), nn.CrossEntropyLoss(), MixedPrecision("fp32"))
        >>> float(step.loss(torch.zeros(1, 3), torch.tensor([0])).detach()) >= 0
        True
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, finetuning: FitFinetuning, loss_fn: Callable,
                 amp: MixedPrecision, device: torch.device | str = "cpu", channels_last: bool = False,
                 ctrl_c: CtrlCGuard | None = None):
        super().__init__(student, loss_fn, amp, device, channels_last, ctrl_c=ctrl_c)
        self.teacher, self.finetuning = teacher, finetuning

    def loss(self, inputs: torch.Tensor, targets: torch.Tensor, distill_factor: float = 0.0) -> torch.Tensor:
        outputs = self.network(inputs)
        with torch.no_grad():
            teacher = self.teacher(inputs)
        return self.finetuning.loss(outputs, teacher, targets, self.loss_fn)
