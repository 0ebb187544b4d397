"""The generation loop of Knowledge Evolution: train, evaluate dense and fit, reset, repeat.

Generation 1 trains the dense network. Every later generation starts from the previous
generation's weights, applies the run's forgetting strategy (:mod:`kecompress.forgetting`; by
default KE's: re-draw the reset hypothesis, keep the fit hypothesis bit for bit), and trains the
whole network again with a new optimizer and the learning-rate schedule from its start. After
every generation the dense network and the fit network (:func:`kecompress.slim.fit_network`) are
evaluated; a target metric for the fit can end the run early.

The loop is made of parts, each owning one thing: :class:`~kecompress.progress.Progress` (where
the run is, saved in every checkpoint), :class:`~kecompress.training.EpochLoop` (an epoch),
:class:`~kecompress.training.TrainingStep` (one batch: DDP, compile, mixed precision, the sums
over ranks), :class:`~kecompress.interrupt.CtrlCGuard`, and callbacks
(:class:`~kecompress.callbacks.Callback`), among them
:class:`~kecompress.checkpoint.Checkpointing`, which writes the run directory.

Under torchrun (a process group initialised, see :mod:`kecompress.distributed`) the same loop
trains with DistributedDataParallel: every rank trains on its part of the data, the gradients
are averaged, metrics are summed over the ranks, and only rank 0 writes files.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from . import distributed
from .acceleration import MixedPrecision, check_channels_last, check_compile
from .callbacks import Callback
from .checkpoint import Checkpointing, restore
from .config import FIT_BATCHNORM, RunConfig, TrainingConfig
from .distillation import FitDistillation, FitPass
from .distributed import on_every_rank
from .edge_popup import EDGE_POPUP_METHODS, fit_parameter_count, plain_network
from .errors import KecompressError
from .evaluation import accuracy, eval_mode, evaluate, parameter_count
from .finetune import FinetuneStep, FitFinetuning
from .forgetting import Forgetting, ResetHypothesis, for_model, settings_of
from .interrupt import CtrlCGuard
from .progress import Progress
from .records import FinetuneRecord, GenerationRecord
from .rundir import RunDirectory
from .seeds import reset_seed
from .shape import Selection, SlimmingLoss
from .slim import fit_network
from .split import Split
from .training import EpochLoop, TrainingStep, make_optimizer


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
        run_dir: the run directory (:mod:`kecompress.rundir`): its configuration, split,
            checkpoints (every epoch), ``metrics.json`` (every generation), the final networks
            and the chart, in the format the command line writes, so that ``kecompress
            report``, ``export`` and ``bench`` read it. Nothing is written when None, nor by any
            rank but rank 0 under torchrun.
        callbacks: :class:`~kecompress.callbacks.Callback` objects, called in order at every
            point of the loop, with the loop.
        fit_batchnorm: ``"re-estimated"`` (default): before the fit network is evaluated, its
            BatchNorm statistics are recomputed on the training data, for the fit network
            alone (measured in docs/generations.md: the fit as cut out lags the dense network,
            re-estimated it matches it). ``"inherited"``: the fit as cut out, with the dense
            network's statistics, as KE's paper measures it. The weights are the same either way.
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"`` (autocast; fp16 with a gradient scaler).
        channels_last: train a convolutional network in the channels-last memory format
            (faster on GPUs with mixed precision); converts ``model`` in place.
        compile_model: train through ``torch.compile`` (slow to start, then faster).
        finetune_fit: epochs (or a :class:`~kecompress.finetune.FitFinetuning`) of fine-tuning
            the fit network alone after the last generation, with knowledge distillation from the
            final dense network; ``fit`` and the saved fit network are then the fine-tuned one,
            its record ``progress.finetune``. KELS only.
        fit_distillation: a :class:`~kecompress.distillation.FitDistillation`: in every step the
            fit network (on its slim shapes for KELS, masked for WELS) also learns from the dense
            network's predictions; the training loss then includes its term.
        run_config: the run's :class:`~kecompress.config.RunConfig` when the model, data and
            loss were built from one (:func:`kecompress.experiment.build`); by default one is
            made from the arguments, marking the data as the caller's own loaders.
        forgetting: what happens to the network before every generation but the first
            (:mod:`kecompress.forgetting`): KE's reset by default, or ``LaterLayers()``,
            ``ShrinkPerturb()``, ``WarmRestart()``, or an object of your own with a
            ``forget_(model, split, seed=None)`` method. Part of the run's identity.
        selection: a :class:`~kecompress.shape.Selection`: after its generation ``after`` the
            split is chosen anew by importance on the dense network (written to the run
            directory, carried by every checkpoint), then fixed; until then BatchNorm scales carry
            its ``sparsity`` penalty. KELS only.

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
        >>> [record.generation for record in history]
        [1, 2]
    """

    def __init__(self, model: nn.Module, split: Split, train_loader, val_loader,
                 config: TrainingConfig | None = None, *, loss_fn: Callable | None = None,
                 metric_fn: Callable = accuracy, metric_name: str = "accuracy",
                 device: torch.device | str = "cpu", example_inputs=None,
                 run_dir: str | Path | RunDirectory | None = None, callbacks: Sequence[Callback] = (),
                 precision: str = "fp32", channels_last: bool = False, compile_model: bool = False,
                 fit_batchnorm: str = "re-estimated", forgetting: Forgetting | None = None,
                 fit_distillation: FitDistillation | None = None, finetune_fit: int | FitFinetuning | None = None,
                 run_config: RunConfig | None = None, selection: Selection | None = None):
        split.check_matches(model)
        if selection is not None and split.method != "kels":
            raise KecompressError("choosing the fit by importance needs a KELS split: drop --select and --widths "
                                  "or use --split kels")
        if selection is not None and fit_distillation is not None and not selection.made(split):
            raise KecompressError("in-place distillation follows a fit fixed from the start: drop --distill-fit, "
                                  "or choose the fit from --weights (before the first generation)")
        if fit_batchnorm not in FIT_BATCHNORM:
            raise KecompressError(f"fit_batchnorm must be one of {', '.join(FIT_BATCHNORM)}, got {fit_batchnorm!r}")
        if distributed.launched() and not distributed.is_distributed():
            raise on_every_rank(KecompressError(
                "torchrun started several processes but this one has joined no process group, so each would "
                "train alone: call kecompress.distributed.setup(device) first"))
        self.finetuning = FitFinetuning(finetune_fit) if isinstance(finetune_fit, int) and finetune_fit else \
            finetune_fit or None
        if self.finetuning and split.method != "kels":
            raise KecompressError("fine-tuning the fit needs a KELS split: a WELS fit is sparse, and training it alone "
                                  "would fill in its zeros; drop --finetune-fit or use --split kels")
        self.amp = MixedPrecision(precision, device)
        if channels_last:
            check_channels_last(model)
        if compile_model:
            check_compile(torch.device(device))
        self.device = torch.device(device)
        # The bare model: resets, slicing, evaluation and checkpoints use it (see TrainingStep).
        self.model = model.to(device, memory_format=torch.channels_last) if channels_last else model.to(device)
        self.split = split
        self.train_loader, self.val_loader = train_loader, val_loader
        self.config = config or TrainingConfig()
        self.loss_fn = loss_fn or nn.CrossEntropyLoss()
        self.metric_fn, self.metric_name = metric_fn, metric_name
        self.fit_batchnorm = fit_batchnorm
        self.example_inputs = example_inputs
        self.forgetting = for_model(ResetHypothesis() if forgetting is None else forgetting, self.model)
        self.selection = selection
        self.run_config = run_config or RunConfig(
            model=None, split=split.method, rate=split.rate, align=split.align, grouped=split.grouped, seed=split.seed,
            val_fraction=None,
            batch_size=getattr(train_loader, "batch_size", None), label_smoothing=None,
            fit_batchnorm=fit_batchnorm, forget=settings_of(self.forgetting), metric=metric_name,
            training=self.config, distill_fit=fit_distillation and fit_distillation.identity(),
            finetune_fit=self.finetuning and self.finetuning.identity(),
            world_size=distributed.world_size(), loaders="python",
            **({"select": selection.select, "widths": selection.widths, "fit_macs": selection.fit_macs,
                "select_after": selection.after, "sparsity": selection.sparsity} if selection else {}))
        self.run_dir = RunDirectory(run_dir) if isinstance(run_dir, (str, Path)) else run_dir
        self.callbacks = ([Checkpointing(self.run_dir)] if self.run_dir else []) + list(callbacks)
        self.progress = Progress()
        self.optimizer = self.schedule = None  # each generation's, made when it starts
        self.fit: nn.Module | None = None  # the fit network of the last finished generation, as measured
        self.ctrl_c = CtrlCGuard()
        fit_pass = FitPass(self.model, split, self.example_input()) if fit_distillation else None
        self.step = TrainingStep(self.model, self.loss_fn, self.amp, self.device, channels_last, compile_model,
                                 self.ctrl_c, fit_distillation, fit_pass)
        self.epochs = EpochLoop(self, self.model, self.step)

    # -- extension points ---------------------------------------------------------------------
    def call(self, hook: str, *args) -> None:
        """Call ``hook`` (``"on_step_end"``, ...) of every callback, in order, with the loop first.

        Example:
            >>> # loop.call("on_epoch_end", generation, epoch)
        """
        for callback in self.callbacks:
            getattr(callback, hook)(self, *args)

    def request_stop(self) -> None:
        """Stop after the current step, as a Ctrl-C does (with a checkpoint when there is a run
        directory); ``run`` then raises :class:`~kecompress.interrupt.RunInterrupted`."""
        self.ctrl_c.stop_requested = True

    # -- the loop ---------------------------------------------------------------------------
    def resume(self, run_dir: str | Path | None = None) -> "Evolution":
        """Continue from the last checkpoint of the run directory, after checking that it holds
        this run (the same configuration: one line naming what differs otherwise).

        A run that died before its first checkpoint has nothing to continue: it starts over.
        Under torchrun, rank 0 reads the checkpoint and sends it to the other ranks, so other
        machines need not see the run directory; the number of processes must be the same.

        Example:
            >>> # Evolution(model, split, train, val, config, run_dir="runs/a").resume().run()
        """
        directory = RunDirectory(run_dir) if run_dir is not None else self.run_dir
        if directory is None:
            raise KecompressError("nothing to resume from: pass run_dir to Evolution (or to resume)")
        restore(self, directory)
        return self

    def run(self) -> list[GenerationRecord]:
        """Train generation after generation (then fine-tune the fit network, if asked); return one
        record of metrics per generation.

        Example:
            >>> # history = Evolution(model, split, train, val, TrainingConfig()).run()
        """
        try:
            return self._run()
        finally:
            if self.run_dir is not None:
                self.run_dir.unlock()  # the writer's lock, held since the run directory was first written

    def _run(self) -> list[GenerationRecord]:
        with self.ctrl_c:
            self.call("on_run_start")
            progress = self.progress
            if progress.phase == "generations":
                self._run_generations()
                if self.fit is None:  # resumed after its last generation: the fit network it measured
                    self.fit = self.fit_network()
                if self.finetuning:
                    progress.start_finetune()
                    self.start_optimizer()
            if progress.phase == "finetune" and progress.finetune is None:
                self._finetune()
            self.call("on_run_end")
        return self.progress.history

    def _run_generations(self) -> None:
        progress = self.progress
        if progress.epochs_done >= self.config.epochs:  # the checkpoint closed a generation
            progress.next_generation()
        while progress.generation <= self.config.generations and not self._target_reached():
            self._run_generation(progress.generation)
            if self._target_reached():
                break
            progress.next_generation()

    def _run_generation(self, generation: int) -> None:
        progress = self.progress
        resumed_inside = progress.inside_generation()
        selection = self.selection
        if selection and not resumed_inside and generation == selection.after + 1 and not selection.made(self.split):
            self._choose_split()
        if selection:  # network slimming's penalty while the shape is still to be chosen
            penalised = selection.sparsity and not selection.made(self.split)
            self.step.loss_fn = SlimmingLoss(self.loss_fn, self.model, selection.sparsity) if penalised else self.loss_fn
        if not resumed_inside:
            if generation > 1:
                self.forgetting.forget_(self.model, self.split, seed=reset_seed(self.config.seed, generation))
                self.call("on_reset", generation)
            self.start_optimizer()
        self.call("on_generation_start", generation)
        started = time.perf_counter()
        train_loss = self._train_epochs(self.epochs, generation, self.config.epochs)
        record = self._evaluate_generation(generation, train_loss, started)
        progress.finish_generation(record)
        self.call("on_generation_end", record)

    def _choose_split(self) -> None:
        """The split chosen by importance on the dense network as it is now (every rank alike: the
        same weights give the same choice), saved to the run directory; fixed from now on."""
        self.split = self.selection.choose(self.model, self.split, self.example_input(), self.train_loader,
                                           self.loss_fn)
        if self.run_dir is not None and distributed.is_main():
            self.run_dir.write_split(self.split)

    def _finetune(self) -> None:
        """Fine-tune ``self.fit`` alone, the dense network its teacher; its epochs draw their seeds
        as a generation after the last one would."""
        progress, student = self.progress, self.fit
        generation = self.config.generations + 1
        step = FinetuneStep(student, self.model, self.finetuning, self.loss_fn, self.amp, self.device,
                            self.step.channels_last, self.ctrl_c)
        epochs = EpochLoop(self, student, step)
        started = time.perf_counter()
        with eval_mode(self.model):  # the teacher: its BatchNorm statistics as they are
            train_loss = self._train_epochs(epochs, generation, self.finetuning.epochs)
        loss, metric = self._evaluate(student)
        progress.finetune = FinetuneRecord(self.finetuning.epochs, self.metric_name, fit=metric, fit_loss=loss,
                                           train_loss=train_loss, seconds=time.perf_counter() - started)
        self.call("on_finetune_end", progress.finetune)

    def _train_epochs(self, epochs: EpochLoop, generation: int, count: int) -> float:
        """Train the epochs of the phase not trained yet, up to ``count``; the last one's mean loss."""
        train_loss = float("nan")
        while self.progress.epochs_done < count:
            epoch = self.progress.epochs_done
            train_loss = epochs.run(generation, epoch)
            self.call("on_epoch_end", generation, epoch)
        return train_loss

    @property
    def phase_epochs(self) -> int:
        """The epochs of the current phase: a generation's, or the fine-tuning's."""
        return self.finetuning.epochs if self.progress.phase == "finetune" else self.config.epochs

    def _target_reached(self) -> bool:
        history = self.progress.history
        return self.config.target is not None and bool(history) and history[-1].fit >= self.config.target

    def start_optimizer(self) -> None:
        """A new optimizer and schedule for the generation (or the fine-tuning) that starts.

        Example:
            >>> # loop.start_optimizer(); loop.epochs.run(generation=1, epoch=0)
        """
        if self.progress.phase == "finetune":
            config = replace(self.config, epochs=self.finetuning.epochs, warmup_epochs=0)
            self.optimizer, self.schedule = make_optimizer(self.fit, config, len(self.train_loader))
        else:
            self.optimizer, self.schedule = make_optimizer(self.model, self.config, len(self.train_loader))

    def train_epoch(self, generation: int, epoch: int) -> float:
        """Train one epoch (counted from 0) exactly as the loop does, callbacks included, with the
        current optimizer (a new one if none was started); return its mean training loss.
        For benchmarks and tests that time or drive an epoch on its own.

        Example:
            >>> import kecompress
            >>> data = [(torch.randn(8, 4), torch.randint(0, 2, (8,)))]
            >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
            >>> loop = Evolution(model, kecompress.split(model, "kels", 0.5), data, data)
            >>> loop.train_epoch(generation=1, epoch=0) > 0
            True
        """
        if self.optimizer is None:
            self.start_optimizer()
        self.progress.epochs_done, self.progress.epoch = epoch, None
        return self.epochs.run(generation, epoch)

    # -- measuring ----------------------------------------------------------------------------
    def _evaluate_generation(self, generation: int, train_loss: float, started: float) -> GenerationRecord:
        """Evaluate the dense and the fit network on the validation data; keep the fit as ``self.fit``."""
        # BatchNorm statistics: DDP gives every rank rank 0's at each forward pass, after which
        # each rank updates its own; make them rank 0's everywhere before evaluating.
        distributed.broadcast_from_main(list(self.model.buffers()))
        # Edge-popup: the dense network is the random one the scores search (what dense.pt holds).
        edge_popup = self.split.method in EDGE_POPUP_METHODS
        dense = plain_network(self.model, keep_masked=False) if edge_popup else self.model
        dense_loss, dense_metric = self._evaluate(dense)
        self.fit = self.fit_network()
        fit_loss, fit_metric = self._evaluate(self.fit)
        # A sparse (WELS, edge-popup) fit keeps the dense shapes: count its fit entries.
        if self.split.method in ("kels", "edge-popup-kels"):
            fit_parameters = parameter_count(self.fit)
        else:
            fit_parameters = fit_parameter_count(self.model) if edge_popup else self.split.fit_parameters(self.model)
        return GenerationRecord(generation, self.metric_name, dense=dense_metric, fit=fit_metric,
                                dense_loss=dense_loss, fit_loss=fit_loss,
                                dense_parameters=parameter_count(dense), fit_parameters=fit_parameters,
                                train_loss=train_loss, seconds=time.perf_counter() - started)

    def _evaluate(self, model: nn.Module) -> tuple[float, float]:
        return evaluate(model, self.val_loader, self.loss_fn, self.metric_fn, self.device,
                        precision=self.amp.precision, across_ranks=True)

    def fit_network(self) -> nn.Module:
        """The fit hypothesis of the model as it is now, as this run measures it
        (:func:`kecompress.slim.fit_network` with the run's settings). Under torchrun every rank
        must call it.

        Example:
            >>> import kecompress
            >>> data = [(torch.randn(8, 4), torch.randint(0, 2, (8,)))]
            >>> model = nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2))
            >>> evolution = Evolution(model, kecompress.split(model, "kels", 0.5), data, data)
            >>> evolution.fit_network()[1].num_features
            8
        """
        return fit_network(self.model, self.split, self.train_loader, fit_batchnorm=self.fit_batchnorm,
                           seed=self.config.seed, device=self.device, example_inputs=self.example_input())

    def example_input(self) -> torch.Tensor:
        """An input batch the fit network is sliced for: ``example_inputs``, or the first
        validation sample."""
        if self.example_inputs is None:
            self.example_inputs = next(iter(self.val_loader))[0][:1]
        return self.example_inputs.to(self.device)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The shape of one input (without the batch), as the fit network was sliced for."""
        return tuple(self.example_input().shape[1:])


def evolve(model: nn.Module, split: Split, train_loader, val_loader,
           config: TrainingConfig | None = None, **options) -> list[GenerationRecord]:
    """Run Knowledge Evolution and return one record of metrics per generation.

    A shortcut for ``Evolution(model, split, train_loader, val_loader, config, **options).run()``;
    see :class:`Evolution` for the options (loss, metric, device, run directory, callbacks).

    Example:
        >>> import kecompress
        >>> x, y = torch.randn(32, 4), torch.randn(32, 1)
        >>> model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1))
        >>> s = kecompress.split(model, "wels", 0.5, seed=0)
        >>> neg_mse = lambda out, tgt: -nn.functional.mse_loss(out, tgt).item()
        >>> history = evolve(model, s, [(x, y)], [(x, y)], TrainingConfig(generations=2, epochs=1, lr=0.01),
        ...                  loss_fn=nn.MSELoss(), metric_fn=neg_mse, metric_name="neg_mse")
        >>> history[-1].to_json()["dense_neg_mse"] < 0
        True
    """
    return Evolution(model, split, train_loader, val_loader, config, **options).run()
