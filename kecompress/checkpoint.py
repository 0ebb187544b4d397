"""Checkpointing: what a run writes into its run directory while it runs, and how it resumes.

:class:`Checkpointing` is the callback that writes ``checkpoint.pt`` after every epoch, at the
end of every generation (and of the fit's fine-tuning) and on Ctrl-C, ``metrics.json`` after
every generation, and the final networks and the chart at the end; :func:`restore` puts a checkpoint back into a loop.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from . import distributed
from .callbacks import Callback
from .progress import Progress
from .rundir import RunDirectory
from .slim import slice_fit
from .split import Split

if TYPE_CHECKING:
    from .evolution import Evolution
    from .records import FinetuneRecord, GenerationRecord


def checkpoint_state(loop: "Evolution") -> dict:
    """Everything a resumed run needs, as plain tensors and numbers (``weights_only`` safe).

    The keys are those of earlier versions, whatever the number of processes: the model's
    parameter names are the bare model's.

    Example:
        >>> # checkpoint_state(loop)["generation"]
    """
    fine_tuning = {"fit": loop.fit.state_dict()} if loop.progress.phase == "finetune" else {}
    return {**loop.progress.state_dict(), **fine_tuning, "model": loop.model.state_dict(),
            "optimizer": loop.optimizer.state_dict(), "schedule": loop.schedule.state_dict(),
            "scaler": loop.amp.state_dict(), "rng": torch.get_rng_state(),
            "config": {**loop.config.identity(), "target": loop.config.target},
            "split": {"method": loop.split.method, "rate": loop.split.rate, "seed": loop.split.seed,
                      **({"chosen": loop.split.to_dict()} if loop.selection else {})},
            "world_size": distributed.world_size()}


def restore(loop: "Evolution", run_dir: RunDirectory) -> bool:
    """Put the last checkpoint of ``run_dir`` back into ``loop`` (model, optimizer, schedule,
    gradient scaler, random state, progress); False when there is none (a run that died before
    its first checkpoint starts over). Under torchrun rank 0 reads it and sends it to the others.

    Example:
        >>> # restore(loop, RunDirectory("runs/a"))
    """
    state = distributed.run_on_main(_read_and_check, loop, run_dir)
    if state is None:
        return False
    loop.model.load_state_dict(state["model"])
    if "chosen" in (state.get("split") or {}):  # the split as it was at the checkpoint: chosen by importance or not yet
        loop.split = Split.from_dict(state["split"]["chosen"])
    loop.progress = Progress.from_state_dict(state, loop.metric_name, distributed.rank())
    if loop.progress.phase == "finetune":  # the fit network being fine-tuned, as it was
        loop.fit = slice_fit(loop.model, loop.split, example_inputs=loop.example_input())
        loop.fit.load_state_dict(state["fit"])
    if loop.progress.inside_generation():  # the optimizer and schedule carry on
        loop.start_optimizer()
        loop.optimizer.load_state_dict(state["optimizer"])
        loop.schedule.load_state_dict(state["schedule"])
    loop.amp.load_state_dict(state.get("scaler"))
    torch.set_rng_state(state["rng"])
    return True


def _read_and_check(loop: "Evolution", run_dir: RunDirectory) -> dict | None:
    run_dir.lock()  # one writer: held until the run ends
    run_dir.check_same_run(loop.run_config, loop.model)
    run_dir.check_other_files(loop.run_config)
    state = run_dir.read_checkpoint(set_aside_damaged=True)
    if state is None:
        return None
    try:
        loop.model.load_state_dict(state["model"])
    except Exception as error:
        raise run_dir.unusable_checkpoint(error) from None
    return state


class Checkpointing(Callback):
    """Writes the run directory as the run goes (on rank 0 only, under torchrun).

    At the start, the configuration, the split and the model the run starts from, unless they are
    there already; after every epoch, ``checkpoint.pt``; after every generation, the checkpoint
    that closes it (with its record) and then ``metrics.json``; on Ctrl-C, a checkpoint inside the
    epoch; at the end, the final dense and fit networks and the chart. Every file is written
    atomically.

    Example:
        >>> # Evolution(..., run_dir="runs/a") adds it for you
    """

    def __init__(self, run_dir: RunDirectory):
        self.run_dir = run_dir

    def on_run_start(self, loop: "Evolution") -> None:
        if not distributed.is_main():
            return
        self.run_dir.lock()  # one writer: held until the run ends
        if not self.run_dir.is_run():  # started from Python: write what the command line writes first
            config = loop.run_config
            source = None if config.arch else config.model or loop.model  # (not trained yet: its architecture)
            self.run_dir.start(config, loop.split, source)
        if loop.progress.history:  # a run killed after its checkpoint, before its metrics
            self._write_metrics(loop)

    def on_epoch_end(self, loop: "Evolution", generation: int, epoch: int) -> None:
        if epoch + 1 < loop.phase_epochs:  # the phase's last epoch: the record's checkpoint follows
            self._save(loop)

    def on_generation_end(self, loop: "Evolution", record: "GenerationRecord") -> None:
        self._save(loop)
        self._write_metrics(loop)

    def on_finetune_end(self, loop: "Evolution", record: "FinetuneRecord") -> None:
        self._save(loop)
        self._write_metrics(loop)

    def on_interrupt(self, loop: "Evolution") -> None:
        self._save(loop)

    def on_run_end(self, loop: "Evolution") -> None:
        if not distributed.is_main():
            return
        from .charts import plot_generations  # matplotlib is slow to import: only when drawing

        fit = loop.fit if loop.split.method in ("kels", "edge-popup-kels") else None
        self.run_dir.save_final(loop.model, fit, loop.split, loop.run_config, loop.input_shape)
        plot_generations({self.run_dir.path.name: loop.progress.history}, self.run_dir.chart_file,
                         title=self.run_dir.title())

    def _write_metrics(self, loop: "Evolution") -> None:
        if distributed.is_main():
            self.run_dir.write_metrics(loop.progress.history, loop.progress.finetune)

    def _save(self, loop: "Evolution") -> None:
        if distributed.is_main():
            self.run_dir.write_checkpoint(checkpoint_state(loop))
