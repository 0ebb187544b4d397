"""Rich progress bars (a callback of the evolve loop) and per-generation tables for `kecompress report`."""

from __future__ import annotations

import time

from rich.console import Console, Group
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from .callbacks import Callback
from .records import FinetuneRecord, GenerationRecord


class RichProgress(Callback):
    """A callback that shows generation, epoch and batch progress (with loss and images/s) and a
    table row of dense and fit metrics after every generation. Use it as a context manager.

    Example:
        >>> # with RichProgress(generations=5) as progress:
        >>> #     Evolution(model, split, train, val, config, callbacks=[progress]).run()
    """

    def __init__(self, generations: int, console: Console | None = None):
        self.console = console or Console()
        self.progress = Progress(
            TextColumn("{task.description:<11}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"), TimeElapsedColumn(),
            console=self.console, transient=True,
            refresh_per_second=2)  # 10 renders a second cost ~3% of a CPU epoch (benchmarks/train_overhead.py)
        self._generation = self.progress.add_task("generation", total=generations, status="")
        self._epoch = self.progress.add_task("epoch", total=1, status="", visible=False)
        self._batch = self.progress.add_task("batch", total=1, status="", visible=False)
        self._rows = 0
        self._epoch_started = time.perf_counter()
        self._samples = 0

    def __enter__(self):
        self.progress.start()
        return self

    def __exit__(self, *exc):
        self.progress.stop()

    def on_generation_start(self, loop, generation: int) -> None:
        self.progress.update(self._generation, completed=generation - 1, status=f"generation {generation}")
        self.progress.reset(self._epoch, total=loop.config.epochs, visible=True)
        self.progress.reset(self._batch, total=len(loop.train_loader), visible=True)

    def on_epoch_start(self, loop, generation: int, epoch: int) -> None:
        if loop.progress.phase == "finetune" and epoch == loop.progress.epochs_done:
            self.progress.update(self._generation, status="fine-tuning the fit")
            self.progress.reset(self._epoch, total=loop.phase_epochs, visible=True)
        self.progress.update(self._epoch, completed=epoch)
        self.progress.reset(self._batch, status="")
        self._epoch_started, self._samples = time.perf_counter(), 0

    def on_step_end(self, loop, loss: float, samples: int) -> None:
        self._samples += samples
        rate = self._samples / max(time.perf_counter() - self._epoch_started, 1e-9)
        self.progress.update(self._batch, advance=1, status=f"loss {loss:.4f}  {rate:,.0f} img/s")

    def on_generation_end(self, loop, record: GenerationRecord) -> None:
        self.progress.update(self._generation, completed=record.generation)
        self.progress.update(self._epoch, completed=self.progress.tasks[self._epoch].total)
        table = _generation_table(record.metric, show_header=self._rows == 0)
        table.add_row(*_generation_row(record))
        self.console.print(table)
        self._rows += 1


    def on_finetune_end(self, loop, record: FinetuneRecord) -> None:
        self.console.print(finetune_line(record))


def finetune_line(record: FinetuneRecord) -> str:
    """One line on the fine-tuned fit network.

    Example:
        >>> finetune_line(FinetuneRecord(5, "accuracy", fit=0.8, fit_loss=0.61, seconds=30.0))
        'fit fine-tuned for 5 epochs: fit acc 80.00%, fit loss 0.6100 (30 s)'
    """
    name = "acc" if record.metric == "accuracy" else record.metric
    seconds = f" ({record.seconds:.0f} s)" if record.seconds is not None else ""
    return (f"fit fine-tuned for {record.epochs} epoch{'s' * (record.epochs != 1)}: fit {name} {_metric(record.fit, record.metric)}, "
            f"fit loss {record.fit_loss:.4f}{seconds}")


def generations_table(records: list[GenerationRecord], title: str | None = None) -> Group:
    """A rich table of a run's generations: dense and fit metric and loss, training loss, time.

    The parameter counts, the same in every generation, go in the title (with ``title``).

    Example:
        >>> record = GenerationRecord(1, "accuracy", dense=0.9, fit=0.5, dense_loss=0.3, fit_loss=1.2,
        ...                           dense_parameters=11_000_000, fit_parameters=2_800_000, train_loss=0.2,
        ...                           seconds=61.0)
        >>> generations_table([record], title="demo").renderables[1].row_count
        1
    """
    first = records[0]
    if title and first.dense_parameters and first.fit_parameters:
        title += f" (dense {_millions(first.dense_parameters)}, fit {_millions(first.fit_parameters)} parameters)"
    table = _generation_table(first.metric, show_header=True)
    for record in records:
        table.add_row(*_generation_row(record))
    return Group(Text(title, style="bold"), table) if title else Group(table)


def _generation_table(metric_name: str, show_header: bool) -> Table:
    table = Table(show_header=show_header, box=None, pad_edge=False)
    name = "acc" if metric_name == "accuracy" else metric_name
    for header in ("gen", f"dense {name}", f"fit {name}", "dense loss", "fit loss", "train loss", "time"):
        table.add_column(header, justify="right", min_width=len(header) if header in ("gen", "time") else 9)
    return table


def _generation_row(record: GenerationRecord) -> list[str]:
    def number(value, show) -> str:  # records written by other code may lack a column
        return show(value) if value is not None else "-"

    metric = lambda value: _metric(value, record.metric)  # noqa: E731
    loss = "{:.4f}".format
    return [str(record.generation), number(record.dense, metric), number(record.fit, metric),
            number(record.dense_loss, loss), number(record.fit_loss, loss), number(record.train_loss, loss),
            number(record.seconds, lambda v: f"{v:.0f} s")]


def _metric(value: float, metric: str) -> str:
    return f"{100 * value:.2f}%" if metric == "accuracy" else f"{value:.4f}"


def _millions(count: int) -> str:
    return f"{count / 1e6:.2f}M"
