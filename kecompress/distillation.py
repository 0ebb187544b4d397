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

from . import distributed
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
    so that the fit learns from a trained teacher); before it the step is a plain one. With
    ``ramp_epochs``, the fit's loss is scaled by a factor that grows linearly, step by step, from
    near 0 to 1 over the first ``ramp_epochs`` epochs of distillation.

    Example:
        >>> FitDistillation().weight, FitDistillation(temperature=4.0).temperature
        (1.0, 4.0)
    """

    temperature: float = 1.0
    weight: float = 1.0
    label_weight: float = 0.0
    # Measured (docs/distillation.md): from the first step it pulled the dense and the fit network
    # down, and ramped in over generation 1 both still ended lower; from generation 2 on the fit
    # ended beside the dense network.
    start_generation: int = 2
    ramp_epochs: float = 0.0

    def __post_init__(self):
        if not self.temperature > 0:
            raise KecompressError(f"the distillation temperature must be positive, got {self.temperature}: e.g. 1")
        if self.weight < 0 or self.label_weight < 0:
            raise KecompressError("the distillation weights must be 0 or more, got "
                                  f"{self.weight} and {self.label_weight}: e.g. 1 and 0")
        if self.start_generation < 1:
            raise KecompressError(f"distillation starts at generation 1 or later, got {self.start_generation}")
        if self.ramp_epochs < 0:
            raise KecompressError(f"the distillation ramp lasts 0 epochs or more, got {self.ramp_epochs}")

    def identity(self) -> dict:
        """The settings as a run's configuration records them."""
        settings = {"temperature": self.temperature, "weight": self.weight, "label_weight": self.label_weight,
                    "start_generation": self.start_generation}
        # Without a ramp the record stays as runs made before the ramp existed wrote it, so they resume.
        return {**settings, "ramp_epochs": self.ramp_epochs} if self.ramp_epochs else settings

    def factor(self, generation: int, epoch: float, epochs_per_generation: int) -> float:
        """What the fit's loss is multiplied by in a step of ``generation`` that ends ``epoch``
        epochs into it (a fraction: 2.5 is the middle of its third epoch): 0 before
        ``start_generation``, then the ramp's linear rise to 1.

        Example:
            >>> ramp = FitDistillation(start_generation=1, ramp_epochs=4)
            >>> [ramp.factor(1, 1.0, 10), ramp.factor(1, 2.0, 10), ramp.factor(2, 0.5, 10)]
            [0.25, 0.5, 1.0]
            >>> FitDistillation().factor(1, 5.0, 10)
            0.0
        """
        if generation < self.start_generation:
            return 0.0
        if not self.ramp_epochs:
            return 1.0
        distilled = (generation - self.start_generation) * epochs_per_generation + epoch
        return min(1.0, distilled / self.ramp_epochs)

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
    """The fit network of ``model``, run on the dense network's parameters.

    KELS: the slim network's modules (from :func:`~kecompress.slice_fit`), called with each
    parameter taken from the dense one through the split's mask (a view where the fit keeps the
    first channels), so that the forward and backward run on the slim shapes. WELS: the dense
    network with the reset entries multiplied by zero. Either way the pass normalises with batch
    statistics and keeps no running ones, so it never changes the dense network's.

    The backward gives the gradients to the pass's own slim tensors; :meth:`add_gradients` then
    adds them into exactly the fit entries of the dense parameters' ``.grad``. Letting autograd
    route them through the gather instead writes a dense-sized gradient per parameter: an epoch
    of ResNet18 with distillation took 1.50x one without that way, 1.37x this way
    (``benchmarks/train_overhead.py``, 2 threads).

    Example:
        >>> import kecompress
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
        >>> fit_pass = FitPass(model, kecompress.split(model, "kels", 0.5), torch.zeros(2, 4))
        >>> fit_pass(torch.randn(3, 4)).sum().backward()
        >>> fit_pass.add_gradients()
        >>> bool(model[0].weight.grad[4:].any()), bool(model[0].weight.grad[:4].any())
        (False, True)
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
        # The pass normalises with batch statistics and keeps no running ones: the dense network's
        # are never touched, and no step spends time updating statistics that nothing reads.
        for module in self.network.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.track_running_stats = False
                module.running_mean = module.running_var = module.num_batches_tracked = None
        self.shapes = {name: param.shape for name, param in self.network.named_parameters()}
        # KELS: each mask keeps a block, the product of the channels it keeps along each dimension;
        # taking it along each dimension (a view where they are the first ones) is far cheaper
        # every step than indexing with the whole mask.
        self.kept = {name: _kept_channels(mask) for name, mask in split.masks.items()
                     if self.kels and name in self.shapes}
        self._leaves: dict[str, torch.Tensor] = {}
        # Each fit parameter must be exactly the fit entries of the dense parameter of its name.
        taken = self._fit_tensors({name: param.detach() for name, param in model.named_parameters()})
        for name, param in self.network.named_parameters():
            if name not in taken or not torch.equal(self._masked(name, taken[name]), param):
                raise KecompressError(f"the fit network's {name} is not the fit entries of the dense network's: "
                                      "in-place distillation cannot gather it; train without it")
        self.network.requires_grad_(False)  # its own parameters only give the shapes

    def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
        """The fit network's outputs; a backward through them leaves the gradients for
        :meth:`add_gradients`."""
        self._leaves = {name: tensor.requires_grad_() for name, tensor in self._fit_tensors(
            {name: param.detach() for name, param in self.model.named_parameters()}).items()}
        parameters = {name: self._masked(name, leaf) for name, leaf in self._leaves.items()}
        return functional_call(self.network, parameters, (inputs,))

    def add_gradients(self) -> None:
        """Add the gradients that the backward gave the last pass into the fit entries of the
        dense parameters' ``.grad``, averaged over the ranks under torchrun as DDP averages the
        dense network's (one collective)."""
        leaves = {name: leaf.grad for name, leaf in self._leaves.items() if leaf.grad is not None}
        self._leaves = {}
        distributed.average_over_ranks(list(leaves.values()))
        for name, param in self.model.named_parameters():
            if name not in leaves:
                continue
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            self._add_into_fit_entries(name, param.grad, leaves[name])

    def _fit_tensors(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The fit network's part of each dense-shaped tensor (all of it for WELS)."""
        taken = {}
        for name, tensor in tensors.items():
            if name not in self.shapes:
                continue
            if self.kels and name in self.split.masks:
                kept = self.kept.get(name)
                if kept is None:
                    continue  # not a block of this fit parameter's shape: refused by the check in __init__
                for dim, channels in enumerate(kept):
                    if isinstance(channels, int):
                        tensor = tensor.narrow(dim, 0, channels)
                    elif channels is not None:
                        tensor = tensor.index_select(dim, channels.to(tensor.device))
            taken[name] = tensor
        return taken

    def _masked(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        mask = None if self.kels else self.split.masks.get(name)
        return tensor if mask is None else tensor * mask.to(tensor.device, tensor.dtype)

    def _add_into_fit_entries(self, name: str, grad: torch.Tensor, fit_grad: torch.Tensor) -> None:
        kept = self.kept.get(name) if self.kels else None
        if kept is None:  # the whole parameter (WELS: its gradient is zero off the mask already)
            grad.add_(fit_grad)
            return
        region, indexed = grad, False
        for dim, channels in enumerate(kept):
            if isinstance(channels, int):
                region = region.narrow(dim, 0, channels)
            indexed = indexed or isinstance(channels, torch.Tensor)
        if not indexed:
            region.add_(fit_grad)
            return
        # Some dimension keeps channels other than the first ones: one index per dimension,
        # shaped to broadcast over the block.
        index = [(channels.to(grad.device) if isinstance(channels, torch.Tensor) else torch.arange(size, device=grad.device))
                 .reshape([-1 if d == dim else 1 for d in range(fit_grad.dim())])
                 for dim, (channels, size) in enumerate(zip(kept, region.shape))]
        region.index_put_(tuple(index), fit_grad, accumulate=True)


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
