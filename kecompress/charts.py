"""Charts of Knowledge Evolution runs: dense and fit metrics against generation, as a PNG."""

from __future__ import annotations

from pathlib import Path

from .errors import KecompressError
from .files import atomic_path
from .records import GenerationRecord


def plot_generations(runs: dict[str, list[GenerationRecord]], path: str | Path, title: str | None = None) -> Path:
    """Draw dense and fit metric (and the losses) against generation for one run or several.

    Solid lines for the dense network, dashed for the fit hypothesis, dotted for the training
    loss; one colour per run when there are several. Beside runs of several generations, a run of
    one generation (an equal-compute baseline trained once for as many epochs, say) is drawn as
    horizontal lines across the chart, to compare with their last generation. Accuracies are drawn
    in percent. The PNG is written atomically.

    Args:
        runs: a legend label -> that run's records (:func:`kecompress.rundir.read_metrics`).
        path: the PNG file to write.
        title: the chart's title.

    Returns:
        ``path``.

    Example:
        >>> import os, tempfile
        >>> records = [GenerationRecord(g, "accuracy", dense=0.5 + g / 10, fit=g / 5, dense_loss=1 / g,
        ...                             fit_loss=2 / g) for g in (1, 2, 3)]
        >>> plot_generations({"demo": records}, os.path.join(tempfile.mkdtemp(), "g.png")).suffix
        '.png'
    """
    # Imported here: only drawing needs matplotlib, and it takes a while to import.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    metrics = {record.metric for records in runs.values() for record in records}
    if len(metrics) != 1:
        raise KecompressError(f"the runs record different metrics ({', '.join(sorted(metrics)) or 'none'}): "
                              "chart runs of the same metric together")
    metric = metrics.pop()
    scale, unit = (100, " (%)") if metric == "accuracy" else (1, "")
    has_loss = any(record.dense_loss is not None for records in runs.values() for record in records)

    figure = Figure(figsize=(11 if has_loss else 6, 4.2), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, 2 if has_loss else 1, squeeze=False)[0]
    several = len(runs) > 1
    as_level = several and any(len(records) > 1 for records in runs.values())

    def draw(axis, records, field, style, marker, colour, label):
        points = [(record.generation, getattr(record, field)) for record in records
                  if getattr(record, field) is not None]
        if not points:
            return
        generations, values = zip(*points)
        values = [scale * value for value in values] if field in ("dense", "fit") else values
        if as_level and len(records) == 1:
            axis.axhline(values[0], linestyle=style, color=colour, label=f"{label} (one generation)")
        else:
            axis.plot(generations, values, style, marker=marker, color=colour, label=label)

    for index, (label, records) in enumerate(runs.items()):
        prefix = f"{label}: " if several else ""
        for series, (side, style, marker) in enumerate((("dense", "-", "o"), ("fit", "--", "s"))):
            draw(axes[0], records, side, style, marker, f"C{index if several else series}", f"{prefix}{side}")
        if has_loss:
            for series, (key, style) in enumerate((("dense_loss", "-"), ("fit_loss", "--"), ("train_loss", ":"))):
                draw(axes[1], records, key, style, ".", f"C{index if several else series}",
                     f"{prefix}{key.replace('_', ' ')}")
    axes[0].set_ylabel(f"validation {metric.replace('_', ' ')}{unit}")
    if has_loss:
        axes[1].set_ylabel("loss")
    for axis in axes:
        axis.set_xlabel("generation")
        axis.xaxis.get_major_locator().set_params(integer=True)
        axis.grid(alpha=0.3)
        axis.legend(fontsize="small")
    if title:
        figure.suptitle(title)
    path = Path(path)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110)
    return path
