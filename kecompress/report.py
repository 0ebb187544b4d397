"""Rich progress bars and per-generation tables for the evolve loop."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table


class RichReporter:
    """Shows generation, epoch and batch progress (with loss and images/s) and a table row of
    dense and fit metrics after every generation. Use it as a context manager.

    Example:
        >>> from kecompress.evolve import Evolution
        >>> # with RichReporter(generations=5, metric_name="accuracy") as reporter:
        >>> #     Evolution(model, split, train, val, config, reporter=reporter).run()
    """

    def __init__(self, generations: int, metric_name: str = "accuracy", console: Console | None = None):
        self.console = console or Console()
        self.metric_name = metric_name
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

    def generation_started(self, generation: int, epochs: int, steps_per_epoch: int) -> None:
        self.progress.update(self._generation, completed=generation - 1, status=f"generation {generation}")
        self.progress.reset(self._epoch, total=epochs, visible=True)
        self.progress.reset(self._batch, total=steps_per_epoch, visible=True)

    def epoch_started(self, generation: int, epoch: int) -> None:
        self.progress.update(self._epoch, completed=epoch)
        self.progress.reset(self._batch, status="")
        self._epoch_started, self._samples = time.perf_counter(), 0

    def step_done(self, loss: float, samples: int) -> None:
        self._samples += samples
        rate = self._samples / max(time.perf_counter() - self._epoch_started, 1e-9)
        self.progress.update(self._batch, advance=1, status=f"loss {loss:.4f}  {rate:,.0f} img/s")

    def generation_done(self, record: dict) -> None:
        self.progress.update(self._generation, completed=record["generation"])
        self.progress.update(self._epoch, completed=self.progress.tasks[self._epoch].total)
        table = Table(show_header=self._rows == 0, box=None, pad_edge=False)
        name = "acc" if self.metric_name == "accuracy" else self.metric_name
        for header in ("gen", f"dense {name}", f"fit {name}", "dense loss", "fit loss", "dense params",
                       "fit params", "time"):
            table.add_column(header, justify="right", min_width=9)
        table.add_row(str(record["generation"]), _metric(record[f"dense_{self.metric_name}"], self.metric_name),
                      _metric(record[f"fit_{self.metric_name}"], self.metric_name), f"{record['dense_loss']:.4f}",
                      f"{record['fit_loss']:.4f}", _millions(record["dense_parameters"]),
                      _millions(record["fit_parameters"]), f"{record['seconds']:.0f} s")
        self.console.print(table)
        self._rows += 1


def _metric(value: float, name: str) -> str:
    return f"{100 * value:.2f}%" if name == "accuracy" else f"{value:.4f}"


def _millions(count: int) -> str:
    return f"{count / 1e6:.2f}M"
