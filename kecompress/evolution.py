"""The generation loop of Knowledge Evolution: train, evaluate dense and fit, reset, repeat.

Generation 1 trains the dense network. Every later generation starts from the previous
generation's weights, re-draws the reset hypothesis (:func:`kecompress.reset_`), keeps the fit
hypothesis bit for bit, and trains the whole network again with a new optimizer and the
learning-rate schedule from its start. After every generation the dense network and the fit
hypothesis are evaluated; a target metric for the fit hypothesis can end the run early.

Under torchrun (a process group initialised, see :mod:`kecompress.distributed`) the same loop
trains with DistributedDataParallel: every rank trains on its part of the data, the gradients
are averaged, metrics are summed over the ranks, and only rank 0 writes files.
"""

from __future__ import annotations

import copy
import math
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Protocol

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import update_bn
from torch.utils.data import DataLoader

from . import distributed
from .distributed import on_every_rank
from .errors import KecompressError
from .files import save_json, save_torch
from .acceleration import MixedPrecision, check_channels_last, check_compile
from .reset import reset_
from .slim import slice_fit
from .split import Split

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.json"
# What the fit network's BatchNorm layers use: statistics re-estimated for the fit network on the
# training data, or those the dense network gathered (KE's definition of the fit, as cut out).
FIT_BATCHNORM = ("re-estimated", "inherited")


@dataclass
class TrainingConfig:
    """Hyper-parameters of every generation (each generation uses the same ones).

    Example:
        >>> TrainingConfig(generations=3, epochs=2).lr
        0.1
    """

    generations: int = 5
    epochs: int = 10
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_epochs: int = 0
    seed: int = 0
    target: float | None = None  # a fit-hypothesis metric at which the run stops early

    def __post_init__(self):
        for name in ("generations", "epochs"):
            if int(getattr(self, name)) < 1:
                raise KecompressError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise KecompressError(f"learning rate must be a positive number, got {self.lr}: e.g. --lr 0.1")
        if self.weight_decay < 0:
            raise KecompressError(f"weight decay must be 0 or more, got {self.weight_decay}")
        if not 0 <= self.warmup_epochs < self.epochs:
            raise KecompressError(
                f"warm-up epochs must be in [0, epochs), got {self.warmup_epochs} with {self.epochs} epochs")


class RunInterrupted(Exception):
    """The run was stopped by Ctrl-C (SIGINT) after saving a checkpoint it can resume from.

    Example:
        >>> str(RunInterrupted(2, 3, 17, saved=True))
        'interrupted at generation 2, epoch 3, step 17; a checkpoint was saved'
    """

    def __init__(self, generation: int, epoch: int, step: int, saved: bool):
        self.generation, self.epoch, self.step, self.saved = generation, epoch, step, saved
        super().__init__(f"interrupted at generation {generation}, epoch {epoch}, step {step}; "
                         + ("a checkpoint was saved" if saved else "nothing was saved (no run directory)"))


class Reporter(Protocol):
    """What the loop tells about its progress; the command line shows it with rich.

    Any object with these four methods will do. Subclass it to write only the events you need:
    the others do nothing.

    Example:
        >>> class LastRecord(Reporter):
        ...     def generation_done(self, record):
        ...         self.record = record
        >>> LastRecord().step_done(loss=0.5, samples=32)  # not overridden: does nothing
    """

    def generation_started(self, generation: int, epochs: int, steps_per_epoch: int) -> None:
        """A generation of ``epochs`` epochs of ``steps_per_epoch`` steps starts."""

    def epoch_started(self, generation: int, epoch: int) -> None:
        """An epoch (counted from 0) of ``generation`` starts."""

    def step_done(self, loss: float, samples: int) -> None:
        """One optimizer step is done: its mean loss over ``samples`` images (every rank's)."""

    def generation_done(self, record: dict) -> None:
        """A generation is done and evaluated: ``record`` is its line of ``metrics.json``."""


def accuracy(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    """Top-1 accuracy of a batch of logits, as a fraction in [0, 1].

    Example:
        >>> accuracy(torch.tensor([[2.0, 1.0], [0.0, 3.0]]), torch.tensor([0, 0]))
        0.5
    """
    return (outputs.argmax(dim=1) == targets).float().mean().item()


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, loss_fn: Callable, metric_fn: Callable,
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
    was_training = model.training
    model.eval()
    amp = MixedPrecision(precision, device)
    total_loss = total_metric = count = 0.0
    for inputs, targets in loader:
        inputs, targets = inputs.to(device), targets.to(device)
        with amp.autocast():
            outputs = model(inputs)
            loss = loss_fn(outputs, targets)
        batch = len(inputs)
        total_loss += loss.item() * batch
        total_metric += metric_fn(outputs, targets) * batch
        count += batch
    model.train(was_training)
    if across_ranks:
        total_loss, total_metric, count = distributed.all_sum([total_loss, total_metric, count], device)
    return total_loss / max(count, 1), total_metric / max(count, 1)


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


def parameter_count(model: nn.Module) -> int:
    """Number of parameter entries of ``model``.

    Example:
        >>> parameter_count(nn.Linear(3, 2))
        8
    """
    return sum(param.numel() for param in model.parameters())


def _epoch_seed(seed: int, generation: int, epoch: int) -> int:
    # Every epoch draws from its own seed, so a run resumed at an epoch boundary replays the
    # same shuffles, augmentations and dropout as one that never stopped.
    return (seed * 1_000_003 + generation * 10_007 + epoch) % (2 ** 63)


def _rank_seed(seed: int, rank: int) -> int:
    # Each rank augments and drops out with its own numbers (rank 0 keeps the single-process
    # seed); the odd 64-bit stride keeps the ranks' seeds far from every other epoch's.
    return (seed + rank * 0x9E3779B97F4A7C15) % (2 ** 63)


def _processes(count: int) -> str:
    return f"{count} process" + ("es" if count != 1 else "")


class Evolution:
    """One Knowledge Evolution run: a model, its split, data, and the generation loop.

    Args:
        model: the dense network; trained in place.
        split: its :class:`~kecompress.Split`, drawn once and fixed for the whole run.
        train_loader, val_loader: the data. Give ``train_loader`` a ``generator`` to make
            shuffling reproducible (it is re-seeded every epoch).
        config: the :class:`TrainingConfig`.
        loss_fn: any loss ``loss_fn(outputs, targets)``; cross-entropy by default.
        metric_fn: any metric ``metric_fn(outputs, targets) -> float``, higher is better;
            accuracy by default. Records name it ``metric_name``.
        example_inputs: an input batch for slicing the fit hypothesis (KELS); by default the
            first validation sample.
        run_dir: where the checkpoint (every epoch) and ``metrics.json`` (every generation)
            go; nothing is written when None, nor by any rank but rank 0 under torchrun.
        reporter: receives progress (see :class:`Reporter`).
        fit_batchnorm: ``"re-estimated"`` (default): before the fit network is evaluated, its
            BatchNorm statistics are recomputed on the training data, for the fit network
            alone; the dense network gathered them with the reset channels feeding into the fit
            ones, so they do not describe the fit network (measured in docs/results.md: the fit
            as cut out lags the dense network, re-estimated it matches it). ``"inherited"``:
            the fit as cut out, with the dense network's statistics, as KE's paper measures it.
            The weights are the same either way.
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"`` (autocast; fp16 with a gradient scaler).
        channels_last: train a convolutional network in the channels-last memory format
            (faster on GPUs with mixed precision); converts ``model`` in place.
        compile_model: train through ``torch.compile`` (slow to start, then faster).

    Under torchrun, with a process group initialised (:func:`kecompress.distributed.setup`),
    training runs through ``DistributedDataParallel``: give ``train_loader`` a
    ``DistributedSampler`` (:func:`kecompress.data.make_loaders` with ``rank`` and
    ``world_size`` does) and each rank a part of the validation data.

    Example:
        >>> import kecompress
        >>> data = [(torch.randn(8, 4), torch.randint(0, 2, (8,)))]
        >>> model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))
        >>> s = kecompress.split(model, "kels", 0.5)
        >>> history = Evolution(model, s, data, data, TrainingConfig(generations=2, epochs=1)).run()
        >>> [record["generation"] for record in history]
        [1, 2]
    """

    def __init__(self, model: nn.Module, split: Split, train_loader, val_loader,
                 config: TrainingConfig | None = None, *, loss_fn: Callable | None = None,
                 metric_fn: Callable = accuracy, metric_name: str = "accuracy",
                 device: torch.device | str = "cpu", example_inputs=None,
                 run_dir: str | Path | None = None, reporter: Reporter | None = None,
                 precision: str = "fp32", channels_last: bool = False, compile_model: bool = False,
                 fit_batchnorm: str = "re-estimated"):
        split.check_matches(model)
        if fit_batchnorm not in FIT_BATCHNORM:
            raise KecompressError(f"fit_batchnorm must be one of {', '.join(FIT_BATCHNORM)}, got {fit_batchnorm!r}")
        self.fit_batchnorm = fit_batchnorm
        if distributed.launched() and not distributed.is_distributed():
            raise on_every_rank(KecompressError(
                "torchrun started several processes but this one has joined no process group, so each would "
                "train alone: call kecompress.distributed.setup(device) first"))
        self.amp = MixedPrecision(precision, device)
        if channels_last:
            check_channels_last(model)
        if compile_model:
            check_compile(torch.device(device))
        self.channels_last, self.compile_model = channels_last, compile_model
        # The bare model: resets, slicing, evaluation and checkpoints use it, so that its
        # parameter names (those of the split) never carry DDP's "module." or compile's "_orig_mod.".
        self.model = model.to(device, memory_format=torch.channels_last) if channels_last else model.to(device)
        self.split = split
        self.train_loader, self.val_loader = train_loader, val_loader
        self.config = config or TrainingConfig()
        self.loss_fn = loss_fn or nn.CrossEntropyLoss()
        self.metric_fn, self.metric_name = metric_fn, metric_name
        self.device = torch.device(device)
        self.example_inputs = example_inputs
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.reporter = reporter
        self.history: list[dict] = []
        self._position = (1, 0)  # (generation, epochs of it already trained)
        self._epoch_progress = None  # how far into the next epoch a Ctrl-C checkpoint got
        self._optimizer_state = self._schedule_state = None
        self._stop_requested = False
        self._network = None  # what training calls; see _training_network

    # -- checkpoints --------------------------------------------------------------------
    def checkpoint_state(self, generation: int, epochs_done: int, optimizer, schedule,
                         epoch_progress: dict | None = None) -> dict:
        """Everything a resumed run needs, as plain tensors and numbers (``weights_only`` safe).

        ``epoch_progress`` (steps, loss sum and samples so far) marks a checkpoint taken inside
        an epoch, when the run is stopped with Ctrl-C. The same keys whatever the number of
        processes: the model's parameter names are the bare model's.

        Example:
            >>> # written for you every epoch when ``run_dir`` is set
        """
        return {"generation": generation, "epochs_done": epochs_done, "epoch_progress": epoch_progress,
                "model": self.model.state_dict(), "optimizer": optimizer.state_dict(),
                "schedule": schedule.state_dict(), "scaler": self.amp.state_dict(), "history": self.history,
                "rng": torch.get_rng_state(), "config": asdict(self.config), "split": self._split_identity(),
                "world_size": distributed.world_size()}

    def _split_identity(self) -> dict:
        return {"method": self.split.method, "rate": self.split.rate, "seed": self.split.seed}

    def resume(self, checkpoint_path: str | Path | None = None) -> "Evolution":
        """Continue from a checkpoint written by an earlier run of the same configuration.

        A run that died before its first checkpoint has nothing to continue: it starts over.
        Under torchrun, rank 0 reads the checkpoint and sends it to the other ranks, so other
        machines need not see the run directory; the number of processes must be the same.

        Example:
            >>> # Evolution(model, split, train, val, config, run_dir="runs/a").resume().run()
        """
        path = Path(checkpoint_path) if checkpoint_path else self.run_dir / CHECKPOINT
        state = distributed.run_on_main(self._read_checkpoint, path)
        if state is None:
            return self
        self.model.load_state_dict(state["model"])
        self.history = list(state["history"])
        self._position = (state["generation"], state["epochs_done"])
        self._optimizer_state, self._schedule_state = state["optimizer"], state["schedule"]
        self.amp.load_state_dict(state.get("scaler"))
        torch.set_rng_state(state["rng"])
        progress = state.get("epoch_progress")
        if progress and "ranks_rng" in progress:  # each rank continues its own random numbers
            progress = dict(progress, rng=progress["ranks_rng"][distributed.rank()])
        self._epoch_progress = progress
        return self

    def _read_checkpoint(self, path: Path) -> dict | None:
        if not path.exists():
            return None
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            self.model.load_state_dict(state["model"])
        except Exception as error:
            raise KecompressError(f"cannot resume from {path} ({error.__class__.__name__}): the checkpoint "
                                  "is damaged or from another model; start a new run with another --out") from None
        if state.get("split") != self._split_identity():
            raise KecompressError(f"the checkpoint in {path.parent} belongs to another split ({state.get('split')}): "
                                  "resume with the split it was made with, or use another --out")
        saved = {key: value for key, value in state["config"].items() if key != "target"}
        current = {key: value for key, value in asdict(self.config).items() if key != "target"}
        if saved != current:
            changed = sorted(key for key in current if saved.get(key) != current[key])
            raise KecompressError(f"the checkpoint in {path.parent} was made with other settings "
                                  f"({', '.join(changed)}): resume with the same settings or use another --out")
        saved_world = state.get("world_size", 1)
        if saved_world != distributed.world_size():
            raise KecompressError(
                f"the checkpoint in {path.parent} was made by {_processes(saved_world)} and this run has "
                f"{_processes(distributed.world_size())}: the images of a step (batch size x processes) and the "
                f"steps of an epoch would change, a different run; resume with {_processes(saved_world)} "
                f"(torchrun --nproc_per_node, times the machines), or use another --out")
        return state

    # -- the loop -----------------------------------------------------------------------
    def run(self) -> list[dict]:
        """Train generation after generation; return one record of metrics per generation.

        Each record holds ``generation``, ``dense_<metric>``, ``fit_<metric>``, ``dense_loss``,
        ``fit_loss``, ``dense_parameters``, ``fit_parameters``, ``train_loss`` and ``seconds``.

        Example:
            >>> # history = Evolution(model, split, train, val, TrainingConfig()).run()
        """
        if self._writes_files:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        with self._stop_on_ctrl_c():
            return self._run()

    @property
    def _writes_files(self) -> bool:
        return self.run_dir is not None and distributed.is_main()

    @contextmanager
    def _stop_on_ctrl_c(self):
        """First Ctrl-C: stop after the current step with a checkpoint. Second: stop at once
        (every file is written atomically, so nothing is left half-written).

        Under torchrun every rank stops after the same step, and further SIGINTs are expected
        (torchrun forwards the terminal's), so they do not cut the checkpoint short; torchrun
        kills the workers if they take longer than its grace period (30 s)."""
        if threading.current_thread() is not threading.main_thread():
            yield  # signal handlers can only be set from the main thread
            return

        def request_stop(signum, frame):
            self._stop_requested = True
            if not distributed.is_distributed():
                signal.signal(signal.SIGINT, signal.default_int_handler)

        previous = signal.signal(signal.SIGINT, request_stop)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    def _run(self) -> list[dict]:
        config = self.config
        generation, epochs_done = self._position
        if epochs_done >= config.epochs:  # the checkpoint closed a generation
            generation, epochs_done = generation + 1, 0
        if self.history and self._target_reached(self.history[-1]):
            return self.history
        while generation <= config.generations:
            if epochs_done == 0 and generation > 1 and not self._epoch_progress:
                reset_(self.model, self.split, seed=_epoch_seed(config.seed, generation, -1))
            record = self._train_generation(generation, epochs_done)
            if self._writes_files:
                save_json({"generations": self.history}, self.run_dir / METRICS)
            if self.reporter:
                self.reporter.generation_done(record)
            if self._target_reached(record):
                break
            generation, epochs_done = generation + 1, 0
        return self.history

    def _target_reached(self, record: dict) -> bool:
        return self.config.target is not None and record[f"fit_{self.metric_name}"] >= self.config.target

    def _train_generation(self, generation: int, epochs_done: int) -> dict:
        config = self.config
        steps = len(self.train_loader)
        optimizer, schedule = make_optimizer(self.model, config, steps)
        if epochs_done > 0 or self._epoch_progress:  # resuming inside this generation
            optimizer.load_state_dict(self._optimizer_state)
            schedule.load_state_dict(self._schedule_state)
        if self.reporter:
            self.reporter.generation_started(generation, config.epochs, steps)
        started = time.perf_counter()
        train_loss = float("nan")
        for epoch in range(epochs_done, config.epochs):
            train_loss = self._train_epoch(generation, epoch, optimizer, schedule)
            if self._writes_files and epoch + 1 < config.epochs:
                save_torch(self.checkpoint_state(generation, epoch + 1, optimizer, schedule),
                           self.run_dir / CHECKPOINT)
        # BatchNorm statistics: DDP gives every rank rank 0's at each forward pass, after which
        # each rank updates its own; make them rank 0's everywhere before evaluating.
        distributed.broadcast_from_main(list(self.model.buffers()))
        dense_loss, dense_metric = self._evaluate(self.model)
        fit_loss, fit_metric, fit_parameters = self.evaluate_fit()
        record = {"generation": generation,
                  f"dense_{self.metric_name}": dense_metric, f"fit_{self.metric_name}": fit_metric,
                  "dense_loss": dense_loss, "fit_loss": fit_loss,
                  "dense_parameters": parameter_count(self.model), "fit_parameters": fit_parameters,
                  "train_loss": train_loss, "seconds": time.perf_counter() - started}
        self.history.append(record)
        if self._writes_files:  # the generation's last checkpoint carries its record
            save_torch(self.checkpoint_state(generation, config.epochs, optimizer, schedule),
                       self.run_dir / CHECKPOINT)
        return record

    def _training_network(self) -> nn.Module:
        """The module training calls: the bare model, wrapped in DistributedDataParallel under
        torchrun (its constructor gives every rank rank 0's weights and buffers), compiled on
        request. Built at the first step, so that a resumed run's weights are the ones sent."""
        if self._network is None:
            network = self.model
            if distributed.is_distributed():
                self._check_distributed_sampler()
                network = DistributedDataParallel(
                    self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
            self._network = torch.compile(network) if self.compile_model else network
        return self._network

    def _check_distributed_sampler(self) -> None:
        if isinstance(self.train_loader, DataLoader) and not hasattr(self.train_loader.sampler, "set_epoch"):
            raise on_every_rank(KecompressError(
                "under torchrun every rank must train on its own part of the data: give the training loader a "
                "DistributedSampler (kecompress.data.make_loaders(..., rank=, world_size=) does)"))

    def _train_epoch(self, generation: int, epoch: int, optimizer, schedule) -> float:
        network = self._training_network()
        epoch_seed = _epoch_seed(self.config.seed, generation, epoch)
        torch.manual_seed(_rank_seed(epoch_seed, distributed.rank()))
        generator = getattr(self.train_loader, "generator", None)
        if generator is not None:
            generator.manual_seed(_rank_seed(epoch_seed, distributed.rank()))
        sampler = getattr(self.train_loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):  # a DistributedSampler: the same order on every rank
            sampler.set_epoch(epoch_seed)
        if self.reporter:
            self.reporter.epoch_started(generation, epoch)
        self.model.train()
        progress, self._epoch_progress = self._epoch_progress, None
        skip, total, count = (progress["steps"], progress["loss_sum"], progress["samples"]) if progress else (0, 0.0, 0)
        for step, (inputs, targets) in enumerate(self.train_loader):
            if step < skip:  # already trained before a Ctrl-C; loading it replays the augmentation draws
                if step + 1 == skip:
                    torch.set_rng_state(progress["rng"])
                continue
            inputs, targets = self._to_device(inputs), targets.to(self.device)
            with self.amp.autocast():
                loss = self.loss_fn(network(inputs), targets)
            optimizer.zero_grad(set_to_none=True)
            self.amp.backward_and_step(loss, optimizer)
            self.amp.step_schedule(schedule)
            # One small collective a step: the loss over every rank, and whether any rank was
            # asked to stop, so that all of them stop after the same step.
            loss_sum, samples, stop = distributed.all_sum(
                [loss.detach().double() * len(inputs), len(inputs), self._stop_requested], self.device)
            if math.isfinite(loss_sum):
                total += loss_sum
                count += int(samples)
            elif self.amp.scaler is None:  # (with one, fp16's scaler skipped this step and lowered its scale)
                raise on_every_rank(KecompressError(
                    f"the loss became {loss_sum / samples} at generation {generation}, epoch {epoch + 1}, "
                    f"step {step + 1}: training diverged; lower the learning rate (now {self.config.lr}) "
                    "and start again"))
            if self.reporter:
                self.reporter.step_done(loss_sum / samples, int(samples))
            # One process also stops for a Ctrl-C that came during the report; ranks must agree.
            if stop or (self._stop_requested and not distributed.is_distributed()):
                self._save_interrupted(generation, epoch, optimizer, schedule,
                                       {"steps": step + 1, "loss_sum": total, "samples": count})
        return total / max(count, 1)

    def _to_device(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.channels_last and inputs.dim() == 4:
            return inputs.to(self.device, memory_format=torch.channels_last)
        return inputs.to(self.device)

    def _save_interrupted(self, generation: int, epoch: int, optimizer, schedule, progress: dict):
        self._stop_requested = False
        rng_states = distributed.all_gather(torch.get_rng_state())
        progress["rng"] = rng_states[distributed.rank()]
        if len(rng_states) > 1:  # a mid-epoch resume continues every rank's own random numbers
            progress["ranks_rng"] = rng_states
        if self._writes_files:
            save_torch(self.checkpoint_state(generation, epoch, optimizer, schedule, progress),
                       self.run_dir / CHECKPOINT)
        distributed.barrier()  # no rank exits (torchrun would then kill the rest) before rank 0 has written
        raise on_every_rank(RunInterrupted(generation, epoch + 1, progress["steps"], saved=self.run_dir is not None))

    def _evaluate(self, model: nn.Module) -> tuple[float, float]:
        return evaluate(model, self.val_loader, self.loss_fn, self.metric_fn, self.device,
                        precision=self.amp.precision, across_ranks=True)

    def evaluate_fit(self) -> tuple[float, float, int]:
        """Loss, metric and parameter count of the fit hypothesis on the validation data, measured
        on :meth:`fit_network`.

        Example:
            >>> # loss, metric, parameters = evolution.evaluate_fit()
        """
        fit = self.fit_network()
        loss, metric = self._evaluate(fit)
        if self.split.method == "kels":
            return loss, metric, parameter_count(fit)
        uncovered = parameter_count(self.model) - self.split.total_count()
        return loss, metric, self.split.fit_count() + uncovered

    def fit_network(self) -> nn.Module:
        """The fit hypothesis of the model as it is now, as a network of its own.

        KELS: the sliced slim network. WELS: a copy of the dense network with the reset weights
        zeroed (a sparse network has no slim form). With ``fit_batchnorm="re-estimated"`` its
        BatchNorm statistics are then recomputed on the training data, from a seed of the run's
        own, so the same weights always give the same network. The model is left untouched.

        Example:
            >>> import kecompress
            >>> data = [(torch.randn(8, 4), torch.randint(0, 2, (8,)))]
            >>> model = nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2))
            >>> evolution = Evolution(model, kecompress.split(model, "kels", 0.5), data, data)
            >>> evolution.fit_network()[1].num_features
            8
        """
        if self.split.method == "kels":  # under torchrun: every rank, each on its part of the data
            example = self.example_inputs
            if example is None:
                example = next(iter(self.val_loader))[0][:1]
            fit = slice_fit(self.model, self.split, example_inputs=example.to(self.device))
        else:
            fit = copy.deepcopy(self.model)
            with torch.no_grad():
                for name, param in fit.named_parameters():
                    if name in self.split.masks:
                        param.mul_(self.split.masks[name].to(param.device, param.dtype))
        if self.fit_batchnorm == "re-estimated":
            self._reestimate_batchnorm(fit)
        return fit

    def _reestimate_batchnorm(self, fit: nn.Module) -> None:
        # The training data's shuffle and augmentation are drawn from a seed of their own, then
        # the random state is restored, so training and resuming are unaffected.
        seed = _rank_seed(_epoch_seed(self.config.seed, 0, -2), distributed.rank())
        generator = getattr(self.train_loader, "generator", None)
        order = generator.get_state() if generator is not None else None
        cuda_devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda_devices):
            torch.manual_seed(seed)
            if generator is not None:
                generator.manual_seed(seed)
            update_bn(self.train_loader, fit, device=self.device)
        if generator is not None:
            generator.set_state(order)
        # Under torchrun each rank saw its part of the training data: average the statistics, so
        # that every rank holds the same fit network (equal parts weigh equally).
        distributed.average_over_ranks([buffer for buffer in fit.buffers() if buffer.is_floating_point()])


def evolve(model: nn.Module, split: Split, train_loader, val_loader,
           config: TrainingConfig | None = None, **options) -> list[dict]:
    """Run Knowledge Evolution and return one record of metrics per generation.

    A shortcut for ``Evolution(model, split, train_loader, val_loader, config, **options).run()``;
    see :class:`Evolution` for the options (loss, metric, device, run directory, reporter).

    Example:
        >>> import kecompress
        >>> x, y = torch.randn(32, 4), torch.randn(32, 1)
        >>> model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1))
        >>> s = kecompress.split(model, "wels", 0.5, seed=0)
        >>> neg_mse = lambda out, tgt: -nn.functional.mse_loss(out, tgt).item()
        >>> history = evolve(model, s, [(x, y)], [(x, y)], TrainingConfig(generations=2, epochs=1, lr=0.01),
        ...                  loss_fn=nn.MSELoss(), metric_fn=neg_mse, metric_name="neg_mse")
        >>> sorted(history[-1])[:3]
        ['dense_loss', 'dense_neg_mse', 'dense_parameters']
    """
    return Evolution(model, split, train_loader, val_loader, config, **options).run()
