"""A generation's metrics as a typed record, written as the JSON keys of ``metrics.json``."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import KecompressError

# Keys of a generation record's JSON that are not "dense_<metric>" metrics.
_NOT_METRICS = {"dense_loss", "dense_parameters"}


@dataclass(frozen=True)
class GenerationRecord:
    """Dense and fit metrics of one generation, measured on the validation data after it.

    In JSON (``metrics.json`` and :meth:`to_json`) the metrics are named after the metric:
    ``dense_accuracy`` and ``fit_accuracy`` for the command line's accuracy.

    Example:
        >>> record = GenerationRecord(1, "accuracy", dense=0.9, fit=0.8, dense_loss=0.3, fit_loss=0.5)
        >>> record.to_json()["fit_accuracy"]
        0.8
        >>> GenerationRecord.from_json(record.to_json()) == record
        True
    """

    generation: int
    metric: str
    dense: float | None
    fit: float | None
    dense_loss: float | None = None
    fit_loss: float | None = None
    dense_parameters: int | None = None
    fit_parameters: int | None = None
    train_loss: float | None = None
    seconds: float | None = None

    def to_json(self) -> dict:
        """The record as a line of ``metrics.json``, in the order earlier versions wrote it."""
        return {"generation": self.generation, f"dense_{self.metric}": self.dense, f"fit_{self.metric}": self.fit,
                "dense_loss": self.dense_loss, "fit_loss": self.fit_loss,
                "dense_parameters": self.dense_parameters, "fit_parameters": self.fit_parameters,
                "train_loss": self.train_loss, "seconds": self.seconds}

    @classmethod
    def from_json(cls, values: dict, metric: str | None = None) -> "GenerationRecord":
        """Read a line of ``metrics.json``; ``metric`` defaults to the one its keys name."""
        metric = metric or metric_of([values])
        return cls(values["generation"], metric, values.get(f"dense_{metric}"), values.get(f"fit_{metric}"),
                   **{key: values.get(key) for key in ("dense_loss", "fit_loss", "dense_parameters",
                                                       "fit_parameters", "train_loss", "seconds")})


def metric_of(records: list[dict]) -> str:
    """The metric JSON records name (for files without a ``"metric"`` entry, as earlier versions wrote).

    Example:
        >>> metric_of([{"generation": 1, "dense_neg_mse": -0.5, "fit_neg_mse": -0.7, "dense_loss": 0.5}])
        'neg_mse'
    """
    first = records[0]
    names = sorted(key[len("dense_"):] for key in first
                   if key.startswith("dense_") and key not in _NOT_METRICS and f"fit_{key[len('dense_'):]}" in first)
    if not names or not all(f"dense_{names[0]}" in record and f"fit_{names[0]}" in record for record in records):
        raise KecompressError("the metrics lack dense_<metric> and fit_<metric> values in some generation: "
                              "they were not written by kecompress")
    return names[0]


@dataclass(frozen=True)
class FinetuneRecord:
    """The fit network after fine-tuning (:mod:`kecompress.finetune`), measured on the validation data.

    Example:
        >>> FinetuneRecord(5, "accuracy", fit=0.8, fit_loss=0.6).to_json()["fit_accuracy"]
        0.8
    """

    epochs: int
    metric: str
    fit: float
    fit_loss: float
    train_loss: float | None = None
    seconds: float | None = None

    def to_json(self) -> dict:
        """The record as ``metrics.json``'s ``"finetune"`` entry."""
        return {"epochs": self.epochs, f"fit_{self.metric}": self.fit, "fit_loss": self.fit_loss,
                "train_loss": self.train_loss, "seconds": self.seconds}

    @classmethod
    def from_json(cls, values: dict, metric: str) -> "FinetuneRecord":
        return cls(values["epochs"], metric, values[f"fit_{metric}"], values["fit_loss"],
                   values.get("train_loss"), values.get("seconds"))
