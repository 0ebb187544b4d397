"""Callbacks: code of yours that the generation loop calls at named points, with the loop.

Subclass :class:`Callback` and override the hooks you need; the others do nothing. Every hook
receives the :class:`~kecompress.Evolution` running, so a callback can read the model, the split,
the optimizer, the progress and the history, and ask the run to stop (``loop.request_stop()``).
The command line's progress display and the run directory's checkpoints are callbacks too.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .errors import KecompressError

if TYPE_CHECKING:  # for the annotations only: evolution.py imports this module
    from .evolution import Evolution
    from .records import FinetuneRecord, GenerationRecord


class Callback:
    """The hooks of the generation loop, in the order a run calls them.

    Example:
        >>> import torch, kecompress
        >>> class Losses(Callback):
        ...     def __init__(self):
        ...         self.losses = []
        ...     def on_step_end(self, loop, loss, samples):
        ...         self.losses.append(loss)
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> data = [(torch.randn(8, 4), torch.randint(0, 2, (8,)))] * 3
        >>> losses = Losses()
        >>> _ = kecompress.evolve(model, kecompress.split(model, "kels", 0.5), data, data,
        ...                       kecompress.TrainingConfig(generations=2, epochs=1), callbacks=[losses])
        >>> len(losses.losses)  # 2 generations x 1 epoch x 3 steps
        6
    """

    def on_run_start(self, loop: "Evolution") -> None:
        """The run starts (or resumes: ``loop.progress`` says where)."""

    def on_generation_start(self, loop: "Evolution", generation: int) -> None:
        """A generation (counted from 1) starts, or resumes inside; its optimizer is ``loop.optimizer``."""

    def on_reset(self, loop: "Evolution", generation: int) -> None:
        """The run's forgetting strategy (KE's reset by default) changed the model before
        ``generation`` (from the second on)."""

    def on_epoch_start(self, loop: "Evolution", generation: int, epoch: int) -> None:
        """An epoch (counted from 0) of ``generation`` starts."""

    def on_step_end(self, loop: "Evolution", loss: float, samples: int) -> None:
        """An optimizer step is done: its mean loss over ``samples`` images (every rank's)."""

    def on_epoch_end(self, loop: "Evolution", generation: int, epoch: int) -> None:
        """An epoch is done (``loop.progress.epochs_done`` counts it)."""

    def on_generation_end(self, loop: "Evolution", record: "GenerationRecord") -> None:
        """A generation is trained and evaluated: ``record`` holds its dense and fit metrics."""

    def on_finetune_end(self, loop: "Evolution", record: "FinetuneRecord") -> None:
        """The fit network's fine-tuning is done (``Evolution(..., finetune_fit=...)``): ``record``
        holds its metric. Its epochs and steps come before, with ``generation`` one past the last."""

    def on_interrupt(self, loop: "Evolution") -> None:
        """The run stops after a Ctrl-C; ``loop.progress.epoch`` says how far into the epoch it got."""

    def on_run_end(self, loop: "Evolution") -> None:
        """The run is done (the last generation, or the target reached); ``loop.fit`` is its fit network."""



class TensorBoard(Callback):
    """Writes a run to TensorBoard event files: the training loss and learning rate every step,
    and the dense and fit metrics and losses every generation (its x axis: generations).

    Needs the ``tensorboard`` package (``pip install 'kecompress[tensorboard]'``). A resumed run
    writes a new event file in the same directory, its steps continuing where the run stopped.
    Under torchrun, give it to rank 0 only.

    Example:
        >>> # kecompress.evolve(model, split, train, val, config, callbacks=[TensorBoard("runs/tb")])
        >>> # then: tensorboard --logdir runs/tb
    """

    def __init__(self, log_dir: str | Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise KecompressError("TensorBoard logging needs the tensorboard package: "
                                  "pip install 'kecompress[tensorboard]'") from None
        self._writer_class = SummaryWriter
        self.log_dir = Path(log_dir)
        if self.log_dir.exists() and not self.log_dir.is_dir():
            raise KecompressError(f"--tensorboard {self.log_dir} is a file: pass a directory path")
        self.writer = None
        self.step = 0

    def on_run_start(self, loop: "Evolution") -> None:
        self.writer = self._writer_class(log_dir=str(self.log_dir))
        progress, steps = loop.progress, len(loop.train_loader)
        epochs_before = (progress.generation - 1) * loop.config.epochs + progress.epochs_done
        self.step = epochs_before * steps + (progress.epoch.steps if progress.epoch else 0)

    def on_step_end(self, loop: "Evolution", loss: float, samples: int) -> None:
        self.step += 1
        self.writer.add_scalar("train/loss", loss, self.step)
        self.writer.add_scalar("train/lr", loop.optimizer.param_groups[0]["lr"], self.step)

    def on_generation_end(self, loop: "Evolution", record: "GenerationRecord") -> None:
        values = {f"dense/{record.metric}": record.dense, f"fit/{record.metric}": record.fit,
                  "dense/loss": record.dense_loss, "fit/loss": record.fit_loss,
                  "train/generation_loss": record.train_loss}
        for tag, value in values.items():
            if value is not None:
                self.writer.add_scalar(tag, value, record.generation)
        self.writer.flush()

    def on_finetune_end(self, loop: "Evolution", record: "FinetuneRecord") -> None:
        """The fit network's fine-tuning is done (``Evolution(..., finetune_fit=...)``): ``record``
        holds its metric. Its epochs and steps come before, with ``generation`` one past the last."""

    def on_finetune_end(self, loop: "Evolution", record: "FinetuneRecord") -> None:
        self.writer.add_scalar(f"finetune/fit_{record.metric}", record.fit, record.epochs)
        self.writer.add_scalar("finetune/fit_loss", record.fit_loss, record.epochs)
        self.writer.flush()

    def on_interrupt(self, loop: "Evolution") -> None:
        self.writer.close()

    def on_run_end(self, loop: "Evolution") -> None:
        self.writer.close()
