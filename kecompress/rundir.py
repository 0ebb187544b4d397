"""The run directory: every file a run writes, and how each is written and read back.

    config.json     the run's configuration (:class:`~kecompress.config.RunConfig`)
    split.pt        the split's masks (plain tensors)
    checkpoint.pt   model, optimizer, schedule, RNG, progress: a resumed run continues here
    metrics.json    {"metric": "accuracy", "generations": [{"generation": 1, "dense_accuracy": ..., ...}, ...],
                    "finetune": {"epochs": ..., "fit_accuracy": ..., "fit_loss": ...} (when fine-tuned)}
    generations.png dense and fit accuracy and the losses against generation (``kecompress report``)
    dense.pt        the final dense model's state_dict (the architecture is in config.json)
    fit.pt          the final fit network (KELS; fine-tuned, when asked): a recipe (architecture and the fit
                    channels of every parameter) plus weights, rebuilt and re-sliced on load
    source_model.pt the whole model the run started from, when it is no architecture built by name
    onnx/           ``kecompress export``'s ONNX files

The command line and the Python API (:class:`~kecompress.Evolution` with ``run_dir``) write the
same files, so either can report, export and resume the other's runs. Every file is written
atomically, and nothing is read with code execution unless the user opted in for the model
file the run started from.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn as nn

from .config import RunConfig, TrainingConfig
from .edge_popup import EDGE_POPUP_METHODS, learned_split, plain_network
from .errors import KecompressError
from .files import atomic_path, save_json, save_torch
from .forgetting import describe
from .models import build_model, load_model_file
from .records import FinetuneRecord, GenerationRecord, metric_of
from .slim import fit_shaped, fit_sized, slice_fit
from .split import Split, block_mask, default_example_inputs, has_grouped_convs, kept_indices, split as make_split

# /2 records the fit channels of every parameter; /1 only the split's method, rate and seed (the rate rule).
FIT_FORMAT, RATE_RULE_FIT_FORMAT = "kecompress-fit/2", "kecompress-fit/1"


class RunDirectory:
    """One run directory: the names of its files, and how each is written and read.

    Example:
        >>> RunDirectory("runs/demo").metrics_file.name
        'metrics.json'
    """

    CONFIG, SPLIT, CHECKPOINT, METRICS = "config.json", "split.pt", "checkpoint.pt", "metrics.json"
    CHART, DENSE, FIT, SOURCE_MODEL, ONNX = "generations.png", "dense.pt", "fit.pt", "source_model.pt", "onnx"
    SHAPE = "shape.pt"  # fit-only runs of a learned or borrowed shape: the split of the source that gives it

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __str__(self) -> str:
        return str(self.path)

    config_file = property(lambda self: self.path / self.CONFIG)
    split_file = property(lambda self: self.path / self.SPLIT)
    shape_file = property(lambda self: self.path / self.SHAPE)
    checkpoint_file = property(lambda self: self.path / self.CHECKPOINT)
    metrics_file = property(lambda self: self.path / self.METRICS)
    chart_file = property(lambda self: self.path / self.CHART)
    dense_file = property(lambda self: self.path / self.DENSE)
    fit_file = property(lambda self: self.path / self.FIT)
    source_model_file = property(lambda self: self.path / self.SOURCE_MODEL)
    onnx_dir = property(lambda self: self.path / self.ONNX)

    def is_run(self) -> bool:
        """Whether a run was started here (its configuration is written)."""
        return self.config_file.is_file()

    # -- the start: configuration, split, the model it started from ---------------------------
    def start(self, config: RunConfig, split: Split, source_model: str | Path | nn.Module | None = None) -> None:
        """Create the directory and write the configuration, the split and, for a model that is
        no architecture built by name, the model it starts from (a file is copied, a module saved whole).

        Example:
            >>> # RunDirectory("runs/a").start(config, split, model)
        """
        self.path.mkdir(parents=True, exist_ok=True)
        if isinstance(source_model, nn.Module):
            save_torch(source_model, self.source_model_file)
        elif source_model is not None:
            with atomic_path(self.source_model_file) as tmp:
                shutil.copyfile(source_model, tmp)
        save_torch(split.to_dict(), self.split_file)
        save_json(config.to_json(), self.config_file)

    def read_config(self) -> RunConfig:
        """The run's configuration.

        Example:
            >>> # RunDirectory("runs/demo").read_config().split
        """
        try:
            return RunConfig.from_json(json.loads(self.config_file.read_text()))
        except FileNotFoundError:
            raise KecompressError(f"{self.path} is not a kecompress run directory (no {self.CONFIG}): "
                                  "pass the --out directory of a `kecompress evolve` run") from None
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError, KecompressError):
            raise KecompressError(f"{self.config_file} is damaged (not a run configuration): "
                                  "the run directory cannot be used") from None

    def read_split(self) -> Split:
        """The split the run was made with (chosen by importance: the one chosen)."""
        return Split.load(self.split_file)

    def write_split(self, split: Split) -> None:
        """Replace the run's split: a split chosen by importance during the run (``--select-after``)."""
        save_torch(split.to_dict(), self.split_file)

    def write_shape(self, shaping: Split) -> None:
        """Record the split of the source architecture whose fit gives a fit-only run its shape."""
        save_torch(shaping.to_dict(), self.shape_file)

    def read_shape(self) -> Split | None:
        """The split that gives a fit-only run its shape, when it was learned or borrowed; None for the rate rule."""
        return Split.load(self.shape_file) if self.shape_file.is_file() else None

    def check_same_run(self, config: RunConfig, model: nn.Module | None = None) -> None:
        """Refuse to continue this run with ``config`` unless it is the same run (one line naming
        what differs). A directory the Python API of an earlier version wrote has no
        ``config.json``: its checkpoint's settings are compared instead. Given the run's ``model``,
        how grouped convolutions are cut is compared only where it has some.

        Example:
            >>> # RunDirectory("runs/a").check_same_run(config)
        """
        if self.is_run():
            saved = self.read_config()
        elif self.checkpoint_file.is_file():
            saved = self._config_in_checkpoint(config)
        else:
            return
        if model is not None and not has_grouped_convs(model):  # the rule changed nothing: runs of before resume
            config = replace(config, grouped=saved.grouped)
        config.check_same_run(saved, self.path)

    def _config_in_checkpoint(self, config: RunConfig) -> RunConfig:
        state = self.read_checkpoint()
        split = state.get("split") or {}
        training = {key: value for key, value in state.get("config", {}).items() if key != "target"}
        return replace(config, split=split.get("method"), rate=split.get("rate"), seed=split.get("seed"), align=1,
                       grouped="narrow",
                       training=TrainingConfig(**training), world_size=state.get("world_size", 1),
                       forget={"name": "ke"})  # the one strategy of the versions that wrote such directories

    # -- during the run: checkpoint and metrics ----------------------------------------------
    def write_checkpoint(self, state: dict) -> None:
        save_torch(state, self.checkpoint_file)

    def read_checkpoint(self) -> dict | None:
        """The last checkpoint (plain tensors and numbers, read with ``weights_only``), or None."""
        if not self.checkpoint_file.exists():
            return None
        try:
            return torch.load(self.checkpoint_file, map_location="cpu", weights_only=True)
        except Exception as error:
            raise self.unusable_checkpoint(error) from None

    def unusable_checkpoint(self, error: Exception) -> KecompressError:
        """The error for a checkpoint that cannot be read, or loaded into the run's model."""
        return KecompressError(f"cannot resume from {self.checkpoint_file} ({error.__class__.__name__}): the "
                               "checkpoint is damaged or from another model; start a new run with another --out")

    def write_metrics(self, records: list[GenerationRecord], finetune: FinetuneRecord | None = None) -> None:
        metric = records[0].metric if records else None
        content = {"metric": metric, "generations": [record.to_json() for record in records]}
        if finetune is not None:
            content["finetune"] = finetune.to_json()
        save_json(content, self.metrics_file)

    def read_finetune(self) -> FinetuneRecord | None:
        """The record of the fit's fine-tuning, when the run fine-tuned it (after :meth:`read_metrics`).

        Example:
            >>> # RunDirectory("runs/demo").read_finetune().fit
        """
        content = json.loads(self.metrics_file.read_text())
        if not content.get("finetune"):
            return None
        metric = content.get("metric") or metric_of(content["generations"])
        try:
            return FinetuneRecord.from_json(content["finetune"], metric)
        except (KeyError, TypeError):
            raise KecompressError(f"{self.metrics_file} is damaged: its \"finetune\" entry lacks fit_{metric} "
                                  "or fit_loss") from None

    def read_metrics(self) -> list[GenerationRecord]:
        """The records of the generations the run has finished so far; works on any directory an
        :class:`~kecompress.Evolution` wrote to, finished or not, of this version or earlier ones.

        Example:
            >>> # [record.fit for record in RunDirectory("runs/demo").read_metrics()]
        """
        if not self.path.is_dir():
            raise KecompressError(f"run directory {self.path} does not exist: pass the --out directory of a "
                                  "`kecompress evolve` run")
        if not self.metrics_file.is_file():
            what = "holds a run that has not finished a generation yet" if self.is_run() \
                else "is not a kecompress run directory"
            raise KecompressError(f"{self.path} {what} (no {self.METRICS}): pass the --out directory of a "
                                  "`kecompress evolve` run, after its first generation")
        try:
            content = json.loads(self.metrics_file.read_text())
            records = content["generations"]
            if not records or not all(isinstance(record, dict) and "generation" in record for record in records):
                raise ValueError
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError):
            raise KecompressError(f"{self.metrics_file} is damaged or not written by kecompress: "
                                  "it needs {\"generations\": [{\"generation\": 1, ...}, ...]}") from None
        metric = content.get("metric") or metric_of(records)
        return [GenerationRecord.from_json(record, metric) for record in records]

    def title(self) -> str | None:
        """What the run trained, for titles; None when the model came from Python.

        Example:
            >>> RunDirectory("nowhere").title() is None
            True
        """
        if not self.is_run():
            return None
        config = self.read_config()
        if config.model is None:
            return None
        data = Path(config.data).name if config.data else "the digits demo"
        forgetting = f", forgetting {describe(config.forget)}" if config.forget != {"name": "ke"} else ""
        aligned = f" aligned to {config.align} channels" if config.align != 1 else ""
        return f"{Path(config.model).name}, {config.split.upper()} rate {config.rate}{aligned}{forgetting}, on {data}"

    # -- the end: the final dense and fit networks -------------------------------------------
    def save_final(self, model: nn.Module, fit: nn.Module | None, split: Split, config: RunConfig,
                   input_shape) -> None:
        """Write the final dense weights and, for KELS, the fit network's recipe and weights.

        ``fit`` is the slim network that was measured (:func:`~kecompress.slim.fit_network`,
        its BatchNorm statistics re-estimated or not); None for a WELS split, whose fit has no
        slim form.

        An edge-popup run (``split.method`` ``"edge-popup"`` or ``"edge-popup-kels"``) writes the
        random weights the scores searched as the dense network, and the split its scores chose
        (WELS-style or KELS) as the run's split: the fit is the dense network masked (or cut) by it.

        Example:
            >>> # RunDirectory("runs/a").save_final(model, loop.fit, split, config, (3, 32, 32))
        """
        if split.method in EDGE_POPUP_METHODS:
            split = learned_split(model, split.rate, split.seed)
            save_torch(split.to_dict(), self.split_file)
            model = plain_network(model, keep_masked=False)
        save_torch(model.state_dict(), self.dense_file)
        if config.fit_only:  # the fit's channels as the source architecture numbers them, so load_fit rebuilds it
            split = self.read_shape() or make_split(self.build_source(config), "kels", config.rate,
                                                    example_inputs=torch.zeros(1, *input_shape), align=config.align,
                                                    grouped=config.grouped)
        if split.method == "kels":
            save_fit(self.fit_file, fit, config, split, input_shape)

    def build_dense(self, config: RunConfig, trust_file: bool = False) -> nn.Module:
        """The dense architecture of the run, freshly initialised (weights are loaded separately):
        the source model's, or for ``fit_only`` the shape of its fit.

        Example:
            >>> RunDirectory("runs/a").build_dense(RunConfig(model="resnet18", num_classes=10)).fc.out_features
            10
        """
        source = self.build_source(config, trust_file)
        if not config.fit_only:
            return source
        channels = default_example_inputs(source).shape[1]
        example = torch.zeros(1, channels, config.image_size, config.image_size)
        shaping = self.read_shape()
        if shaping is not None:
            return fit_shaped(source, shaping, example)
        return fit_sized(source, config.rate, config.align, example, grouped=config.grouped)[0]

    def build_source(self, config: RunConfig, trust_file: bool = False) -> nn.Module:
        """The architecture the run started from (its name, or the model file it copied), freshly initialised.

        Example:
            >>> RunDirectory("runs/a").build_source(RunConfig(model="resnet18", num_classes=10)).fc.out_features
            10
        """
        if config.arch:
            return build_model(config.arch, config.num_classes, config.image_size)
        if not self.source_model_file.is_file():
            raise KecompressError(f"{self.path} records no architecture and holds no {self.SOURCE_MODEL}: "
                                  "it was written by a Python run of an earlier version; rebuild its model in Python")
        return load_model_file(self.source_model_file, trust_file=trust_file)

    def load(self, trust_file: bool = False) -> tuple[nn.Module, Split, RunConfig]:
        """The final dense model of a finished run, its split and its configuration.

        Example:
            >>> # dense, split, config = RunDirectory("runs/demo").load()
        """
        config = self.read_config()
        if not self.dense_file.is_file():
            raise KecompressError(f"{self.path} holds no final model ({self.DENSE}): the run has not finished; "
                                  f"finish it with `kecompress evolve ... --out {self.path} --resume`")
        dense = self.build_dense(config, trust_file)
        try:
            dense.load_state_dict(torch.load(self.dense_file, map_location="cpu", weights_only=True))
        except Exception as error:
            raise KecompressError(f"cannot load {self.dense_file} ({error.__class__.__name__}): "
                                  "the file is damaged or from another model") from None
        split = self.read_split()
        split.check_matches(dense)
        return dense.eval(), split, config


def read_metrics(run_dir: str | Path) -> list[GenerationRecord]:
    """The records of the generations the run in ``run_dir`` has finished so far.

    Example:
        >>> # [record.fit for record in read_metrics("runs/demo")]
    """
    return RunDirectory(run_dir).read_metrics()


def load_run(run_dir: str | Path, trust_file: bool = False) -> tuple[nn.Module, Split, RunConfig]:
    """The final dense model of the finished run in ``run_dir``, its split and its configuration.

    Example:
        >>> # dense, split, config = load_run("runs/demo")
    """
    return RunDirectory(run_dir).load(trust_file)


def save_fit(path: Path, fit: nn.Module, config: RunConfig, split: Split, input_shape) -> None:
    """Save a slim fit network as a recipe (architecture, the split's fit channels, input shape)
    plus its weights.

    It reloads with :func:`load_fit` without running code from the file: the architecture is
    rebuilt and cut to the saved channels, however the split chose them, then the weights are
    loaded into it.

    Example:
        >>> # save_fit(Path("fit.pt"), fit, RunConfig(model="resnet18", num_classes=10), split, (3, 32, 32))
    """
    # The kept indices along each dimension: a KELS mask is their block, and they take far less room.
    fit_channels = {name: kept_indices(mask) for name, mask in split.masks.items()}
    recipe = {"format": FIT_FORMAT, "arch": config.arch, "num_classes": config.num_classes,
              "method": split.method, "rate": split.rate, "seed": split.seed, "align": split.align, "grouped": split.grouped,
              "fit_channels": fit_channels, "input_shape": list(input_shape), "state_dict": fit.state_dict()}
    save_torch(recipe, path)


def load_fit(path: str | Path, dense: nn.Module | None = None) -> nn.Module:
    """Rebuild a fit network saved by :func:`save_fit`.

    Args:
        path: the ``fit.pt`` file.
        dense: the dense architecture, needed only when the run started from a model file
            rather than an architecture name (its weights do not matter).

    Example:
        >>> # fit = load_fit("runs/demo/fit.pt")
    """
    try:
        recipe = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise KecompressError(f"no fit network at {path}: it is written at the end of a KELS run") from None
    except Exception as error:
        raise KecompressError(f"cannot read fit network {path} ({error.__class__.__name__}): "
                              "the file is damaged or not a kecompress fit network") from None
    if not isinstance(recipe, dict) or recipe.get("format") not in (FIT_FORMAT, RATE_RULE_FIT_FORMAT):
        raise KecompressError(f"{path} is not a kecompress fit network")
    if dense is None:
        if not recipe["arch"]:
            raise KecompressError(f"{path} was cut from a model file: pass its dense model to load_fit")
        dense = build_model(recipe["arch"], recipe["num_classes"], recipe["input_shape"][-1])
    example = torch.zeros(1, *recipe["input_shape"])
    if recipe["format"] == FIT_FORMAT:
        shapes = {name: param.shape for name, param in dense.named_parameters()}
        if set(recipe["fit_channels"]) != set(shapes):
            raise KecompressError(f"the fit channels in {path} do not name this model's parameters: "
                                  "the file does not belong to this architecture")
        masks = {name: block_mask(shapes[name], kept) for name, kept in recipe["fit_channels"].items()}
        the_split = Split(recipe["method"], recipe["rate"], recipe["seed"], masks, recipe["align"],
                          recipe.get("grouped", "narrow"))
    else:  # written before the fit channels were saved: made by the rate rule, which splitting again repeats
        the_split = make_split(dense, recipe["method"], recipe["rate"], example_inputs=example, seed=recipe["seed"])
    fit = slice_fit(dense, the_split, example_inputs=example)
    try:
        fit.load_state_dict(recipe["state_dict"])
    except RuntimeError:
        raise KecompressError(f"the weights in {path} do not fit the rebuilt network: "
                              "the file does not belong to this architecture") from None
    return fit.eval()
