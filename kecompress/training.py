"""Training: the optimizer and its schedule, one training step, and the epoch loop.

:class:`TrainingStep` owns how one batch trains the model (DistributedDataParallel under
torchrun, ``torch.compile``, mixed precision, in-place distillation of the fit network, the loss
summed over the ranks);
:class:`EpochLoop` owns an epoch (its seeds, the steps a Ctrl-C checkpoint already trained,
divergence, the stop after a Ctrl-C). The generation loop around them is
:class:`kecompress.Evolution`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from . import distributed
from .acceleration import MixedPrecision
from .config import TrainingConfig
from .distillation import FitDistillation, FitPass
from .distributed import on_every_rank
from .errors import KecompressError
from .interrupt import CtrlCGuard, RunInterrupted
from .progress import EpochProgress
from .seeds import epoch_seed, rank_seed, seed_loader

if TYPE_CHECKING:
    from .evolution import Evolution


def make_optimizer(model: nn.Module, config: TrainingConfig, steps_per_epoch: int):
    """A fresh SGD optimizer and its per-step schedule: linear warm-up, then cosine to zero.

    Example:
        >>> opt, schedule = make_optimizer(nn.Linear(2, 2), TrainingConfig(epochs=2), steps_per_epoch=5)
        >>> opt.param_groups[0]["lr"]
        0.1
    """
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    total = config.epochs * steps_per_epoch
    warmup = config.warmup_epochs * steps_per_epoch
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total - warmup, 1))
    if warmup == 0:
        return optimizer, cosine
    linear = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1.0 / warmup, total_iters=warmup)
    return optimizer, torch.optim.lr_scheduler.SequentialLR(optimizer, [linear, cosine], milestones=[warmup])


class TrainingStep:
    """One optimizer step on one batch: forward and loss under autocast, backward and step
    (through fp16's gradient scaler), the schedule, and one small collective that sums the loss
    and the images over the ranks and tells whether any rank was asked to stop.

    The network it calls is the bare model, wrapped in DistributedDataParallel under torchrun
    (its constructor gives every rank rank 0's weights and buffers) and compiled on request; it
    is built at the first step, so that a resumed run's weights are the ones sent. Everything
    else (resets, slicing, evaluation, checkpoints) uses the bare model, whose parameter names
    never carry DDP's ``module.`` or compile's ``_orig_mod.``.

    Example:
        >>> model = nn.Linear(3, 2)
        >>> step = TrainingStep(model, nn.CrossEntropyLoss(), MixedPrecision("fp32"))
        >>> optimizer, schedule = make_optimizer(model, TrainingConfig(epochs=1), steps_per_epoch=1)
        >>> loss_sum, samples, stop = step(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]), optimizer, schedule)
        >>> samples, stop
        (4.0, 0.0)
    """

    def __init__(self, model: nn.Module, loss_fn: Callable, amp: MixedPrecision, device: torch.device | str = "cpu",
                 channels_last: bool = False, compile_model: bool = False, ctrl_c: CtrlCGuard | None = None,
                 distillation: FitDistillation | None = None, fit_pass: FitPass | None = None):
        self.model, self.loss_fn, self.amp = model, loss_fn, amp
        self.ctrl_c = ctrl_c or CtrlCGuard()
        self.distillation, self.fit_pass = distillation, fit_pass
        self.device = torch.device(device)
        self.channels_last, self.compile_model = channels_last, compile_model
        self._network = None

    @property
    def network(self) -> nn.Module:
        """What training calls: the model, wrapped for DDP and compiled as asked."""
        if self._network is None:
            network = self.model
            if distributed.is_distributed():
                network = DistributedDataParallel(
                    self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
            self._network = torch.compile(network) if self.compile_model else network
        return self._network

    def __call__(self, inputs: torch.Tensor, targets: torch.Tensor, optimizer, schedule,
                 distill_factor: float = 0.0) -> tuple[float, float, float]:
        """Train on one batch; return the loss summed over its images, the images and whether a
        stop was requested (``ctrl_c``, during the step included), each summed over the ranks.
        With in-place distillation (``distill_factor`` > 0: what :meth:`FitDistillation.factor`
        gives this step) the loss is the dense and the fit network's together."""
        inputs, targets = self._to_device(inputs), targets.to(self.device)
        distilling = bool(self.distillation and distill_factor)
        with self.amp.autocast():
            loss = self.loss(inputs, targets, distill_factor if distilling else 0.0)
        optimizer.zero_grad(set_to_none=True)
        self.amp.backward_and_step(loss, optimizer, before_step=self.fit_pass.add_gradients if distilling else None)
        self.amp.step_schedule(schedule)
        loss_sum, samples, stop = distributed.all_sum(
            [loss.detach().double() * len(inputs), len(inputs), self.ctrl_c.stop_requested], self.device)
        return loss_sum, samples, stop

    def loss(self, inputs: torch.Tensor, targets: torch.Tensor, distill_factor: float = 0.0) -> torch.Tensor:
        """The loss one step minimises (under autocast): the fit's, times ``distill_factor``, added."""
        outputs = self.network(inputs)
        loss = self.loss_fn(outputs, targets)
        if distill_factor:
            loss = loss + distill_factor * self.distillation.loss(self.fit_pass(inputs), outputs, targets, self.loss_fn)
        return loss

    def _to_device(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.channels_last and inputs.dim() == 4:
            return inputs.to(self.device, memory_format=torch.channels_last)
        return inputs.to(self.device)


class EpochLoop:
    """One epoch of a generation: seeds it, skips the steps a Ctrl-C checkpoint already trained,
    runs :class:`TrainingStep` on every batch, stops on a diverging loss, and stops with a
    checkpoint (the ``on_interrupt`` callbacks) after a Ctrl-C.

    Example:
        >>> # loop.epochs.run(generation=1, epoch=0) trains one epoch of ``loop``, an Evolution
    """

    def __init__(self, loop: "Evolution", model: nn.Module, step: TrainingStep):
        self.loop, self.model, self.step = loop, model, step

    def run(self, generation: int, epoch: int) -> float:
        """Train one epoch (counted from 0) with the loop's optimizer; return its mean training loss."""
        loop = self.loop
        loader, rank = loop.train_loader, distributed.rank()
        self._check_distributed_sampler(loader)
        seed = epoch_seed(loop.config.seed, generation, epoch)
        seed_loader(loader, rank_seed(seed, rank))
        sampler = getattr(loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):  # a DistributedSampler: the same order on every rank
            sampler.set_epoch(seed)
        loop.call("on_epoch_start", generation, epoch)
        self.model.train()
        # Resumed inside the epoch: its first steps were trained before the Ctrl-C; loading their
        # batches replays the augmentation draws, then the random state continues after them.
        resumed = loop.progress.epoch
        progress = EpochProgress(resumed.steps, resumed.loss_sum, resumed.samples) if resumed else EpochProgress()
        loop.progress.epoch = progress
        distillation, steps = self.step.distillation, len(loader)
        for step, (inputs, targets) in enumerate(loader):
            if step < progress.steps:
                if step + 1 == progress.steps:
                    torch.set_rng_state(resumed.rng)
                continue
            factor = distillation.factor(generation, epoch + (step + 1) / steps, loop.config.epochs) \
                if distillation else 0.0
            loss_sum, samples, stop = self.step(inputs, targets, loop.optimizer, loop.schedule, factor)
            if math.isfinite(loss_sum):
                progress.add(loss_sum, int(samples))
            elif loop.amp.scaler is None:  # (with one, fp16's scaler skipped this step and lowered its scale)
                raise on_every_rank(KecompressError(
                    f"the loss became {loss_sum / samples} at generation {generation}, epoch {epoch + 1}, "
                    f"step {step + 1}: training diverged; lower the learning rate (now {loop.config.lr}) "
                    "and start again"))
            else:
                progress.steps += 1
            loop.call("on_step_end", loss_sum / samples, int(samples))
            # One process also stops for a Ctrl-C that came during the callbacks; ranks must agree.
            if stop or (loop.ctrl_c.stop_requested and not distributed.is_distributed()):
                self._stop(generation, epoch, progress)
        loop.progress.finish_epoch()
        return progress.mean_loss()

    def _stop(self, generation: int, epoch: int, progress: EpochProgress):
        loop = self.loop
        loop.ctrl_c.stop_requested = False
        rng_states = distributed.all_gather(torch.get_rng_state())
        progress.rng = rng_states[distributed.rank()]
        if len(rng_states) > 1:  # a mid-epoch resume continues every rank's own random numbers
            progress.ranks_rng = rng_states
        loop.call("on_interrupt")
        distributed.barrier()  # no rank exits (torchrun would then kill the rest) before rank 0 has written
        raise on_every_rank(RunInterrupted(generation, epoch + 1, progress.steps, saved=loop.run_dir is not None))

    @staticmethod
    def _check_distributed_sampler(loader) -> None:
        if distributed.is_distributed() and isinstance(loader, DataLoader) \
                and not hasattr(loader.sampler, "set_epoch"):
            raise on_every_rank(KecompressError(
                "under torchrun every rank must train on its own part of the data: give the training loader a "
                "DistributedSampler (kecompress.data.make_loaders(..., rank=, world_size=) does)"))
