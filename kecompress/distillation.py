"""In-place distillation of the fit network: in every training step, the fit sub-network, which
shares the dense network's weights, also learns from the dense network's predictions.

As in slimmable networks (Yu & Huang, "Universally Slimmable Networks and Improved Training
Techniques", ICCV 2019): the widest network trains on the labels, the narrower one, in the same
step, on the widest one's soft predictions. For KELS the narrower network is the slim fit network
itself: :class:`FitPass` runs it on the slim shapes, its parameters gathered from the dense ones,
so that a step costs the fit's MACs more (a quarter at rate 0.5), not a second dense pass, and
its gradients reach exactly the fit entries of the dense parameters. For WELS (sparse, with no
slim form) the pass is the dense network with the reset entries masked out.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from .errors import KecompressError
from .slim import slice_fit
from .split import Split, kept_indices


@dataclass(frozen=True)
class FitDistillation:
    """How the fit network learns from the dense one in every step.

    The fit's loss, added to the dense network's, is ``weight * temperature**2 *
    KL(dense || fit)`` on the temperature-softened predictions (the dense ones detached: a
    teacher), plus ``label_weight`` times the training loss of the fit on the labels. From
    ``start_generation`` on (by default the second: generation 1 trains the dense network alone,
    so that the fit learns from a trained teacher); before it the step is a plain one.

    Example:
        >>> FitDistillation().weight, FitDistillation(temperature=4.0).temperature
        (1.0, 4.0)
    """

    temperature: float = 1.0
    weight: float = 1.0
    label_weight: float = 0.0
    # Measured (docs/distillation.md): from the first step it pulled the dense and the fit network
    # down; from generation 2 on the fit ended beside the dense network.
    start_generation: int = 2

    def __post_init__(self):
        if not self.temperature > 0:
            raise KecompressError(f"the distillation temperature must be positive, got {self.temperature}: e.g. 1")
        if self.weight < 0 or self.label_weight < 0:
            raise KecompressError("the distillation weights must be 0 or more, got "
                                  f"{self.weight} and {self.label_weight}: e.g. 1 and 0")
        if self.start_generation < 1:
            raise KecompressError(f"distillation starts at generation 1 or later, got {self.start_generation}")

    def identity(self) -> dict:
        """The settings as a run's configuration records them."""
        return {"temperature": self.temperature, "weight": self.weight, "label_weight": self.label_weight,
                "start_generation": self.start_generation}

    def loss(self, fit_outputs: torch.Tensor, dense_outputs: torch.Tensor, targets: torch.Tensor,
             loss_fn) -> torch.Tensor:
        """The fit's loss: the distillation term, and ``label_weight`` x ``loss_fn`` on the labels.

        Example:
            >>> logits = torch.tensor([[2.0, 0.0]])
            >>> float(FitDistillation(label_weight=0.0).loss(logits, logits, torch.tensor([0]), None))
            0.0
        """
        loss = self.weight * self.kl_loss(fit_outputs, dense_outputs)
        return loss + self.label_weight * loss_fn(fit_outputs, targets) if self.label_weight else loss

    def kl_loss(self, fit_outputs: torch.Tensor, dense_outputs: torch.Tensor) -> torch.Tensor:
        """The distillation term, unweighted: :func:`softened_kl` at this temperature."""
        return softened_kl(fit_outputs, dense_outputs, self.temperature)


def softened_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """``temperature**2`` x KL(teacher || student) of the temperature-softened predictions, the
    teacher's as fixed targets (Hinton et al., "Distilling the Knowledge in a Neural Network", 2015).

    Example:
        >>> logits = torch.tensor([[2.0, 0.0]])
        >>> float(softened_kl(logits, logits, 4.0))
        0.0
    """
    t = temperature
    return F.kl_div(F.log_softmax(student.float() / t, dim=1), F.log_softmax(teacher.detach().float() / t, dim=1),
                    reduction="batchmean", log_target=True) * t * t


class FitPass:
    """The fit network of ``model`` as a function of the dense network's parameters.

    KELS: the slim network's modules (from :func:`~kecompress.slice_fit`), called with each
    parameter gathered from the dense one through the split's mask, so that the forward and
    backward run on the slim shapes and the gradients land on exactly the fit entries of the
    dense parameters. WELS: the dense network with the reset entries multiplied by zero. Either
    way the pass has BatchNorm buffers of its own, so it never changes the dense network's
    running statistics.

    Example:
        >>> import kecompress
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
        >>> fit_pass = FitPass(model, kecompress.split(model, "kels", 0.5), torch.zeros(2, 4))
        >>> fit_pass(torch.randn(3, 4)).shape
        torch.Size([3, 2])
    """

    def __init__(self, model: nn.Module, split: Split, example_inputs: torch.Tensor):
        self.model, self.split = model, split
        self.kels = split.method == "kels"
        if self.kels:
            self.network = slice_fit(model, split, example_inputs=example_inputs)
        else:  # the dense network with its reset entries zeroed, as the fit network of a WELS split is
            self.network = copy.deepcopy(model)
            with torch.no_grad():
                for name, param in self.network.named_parameters():
                    if name in split.masks:
                        param.mul_(split.masks[name].to(param.device, param.dtype))
        self.network.train()
        self.shapes = {name: param.shape for name, param in self.network.named_parameters()}
        # KELS: each mask keeps a block, the product of the channels it keeps along each dimension;
        # gathering along each dimension (a view where they are the first ones) is far cheaper
        # every step than indexing with the whole mask.
        self.kept = {name: _kept_channels(mask) for name, mask in split.masks.items()
                     if self.kels and name in self.shapes}
        # Each fit parameter must be exactly the fit entries of the dense parameter of its name.
        with torch.no_grad():
            gathered = self.parameters()
        for name, param in self.network.named_parameters():
            if name not in gathered or not torch.equal(gathered[name], param):
                raise KecompressError(f"the fit network's {name} is not the fit entries of the dense network's: "
                                      "in-place distillation cannot gather it; train without it")
        self.network.requires_grad_(False)  # its own parameters only give the shapes

    def parameters(self) -> dict[str, torch.Tensor]:
        """The fit network's parameters, gathered from the dense network's (gradients flow back)."""
        gathered = {}
        for name, param in self.model.named_parameters():
            if name not in self.shapes:
                continue
            mask = self.split.masks.get(name)
            if mask is None:
                gathered[name] = param
            elif self.kels:
                kept = self.kept.get(name)
                if kept is None:
                    continue  # not a block of this fit parameter's shape: refused by the check in __init__
                for dim, channels in enumerate(kept):
                    if isinstance(channels, int):
                        param = param.narrow(dim, 0, channels)
                    elif channels is not None:
                        param = param.index_select(dim, channels.to(param.device))
                gathered[name] = param
            else:
                gathered[name] = param * mask.to(param.device, param.dtype)
        return gathered

    def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
        buffers = dict(self.network.named_buffers())
        return functional_call(self.network, {**self.parameters(), **buffers}, (inputs,))


def _kept_channels(mask: torch.Tensor) -> list | None:
    """Along each dimension of a KELS mask, the indices it keeps: None for all of them, a count
    for the first ones, a tensor otherwise; None when the mask is not such a block.

    Example:
        >>> mask = torch.zeros(4, 3, dtype=torch.bool)
        >>> mask[:2, [0, 2]] = True
        >>> _kept_channels(mask)
        [2, tensor([0, 2])]
    """
    indices = kept_indices(mask)
    if indices is None:
        return None
    return [None if len(kept) == size else len(kept) if torch.equal(kept, torch.arange(len(kept))) else kept
            for kept, size in zip(indices, mask.shape)]
