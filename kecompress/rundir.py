"""The run directory of ``kecompress evolve``: what a run writes, and how it is read back.

    config.json     the run's configuration (model, split, data, hyper-parameters)
    split.pt        the split's masks (plain tensors)
    checkpoint.pt   model, optimizer, schedule, RNG, generation and epoch: ``--resume`` continues here
    metrics.json    {"generations": [{"generation": 1, "dense_accuracy": ..., "fit_accuracy": ...}, ...]}
    generations.png dense and fit accuracy and the losses against generation (``kecompress report``)
    dense.pt        the final dense model's state_dict (the architecture is in config.json)
    fit.pt          the final fit network (KELS): a recipe plus weights, rebuilt and re-sliced on load
    source_model.pt a copy of the model file the run started from, when it started from a file

Every file is written atomically, and nothing is read with code execution unless the user
opted in for the model file the run started from.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.nn as nn

from .errors import KecompressError
from .evolution import METRICS
from .files import atomic_path, save_json, save_torch
from .models import build_model, load_model_file
from .slim import slice_fit
from .split import Split, split as make_split

CONFIG, SPLIT, DENSE, FIT, SOURCE_MODEL = "config.json", "split.pt", "dense.pt", "fit.pt", "source_model.pt"
CHART = "generations.png"
FIT_FORMAT = "kecompress-fit/1"


def read_config(run_dir: str | Path) -> dict:
    """The configuration of the run in ``run_dir``.

    Example:
        >>> # read_config("runs/demo")["split"]
    """
    path = Path(run_dir) / CONFIG
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise KecompressError(f"{run_dir} is not a kecompress run directory (no {CONFIG}): "
                              "pass the --out directory of a `kecompress evolve` run") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise KecompressError(f"{path} is damaged (not JSON): the run directory cannot be used") from None


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of the generations a run has finished so far (``metrics.json``).

    Works on any directory an :class:`~kecompress.Evolution` wrote to, finished or not.

    Example:
        >>> # [record["fit_accuracy"] for record in read_metrics("runs/demo")]
    """
    run_dir = Path(run_dir)
    path = run_dir / METRICS
    if not run_dir.is_dir():
        raise KecompressError(f"run directory {run_dir} does not exist: pass the --out directory of a "
                              "`kecompress evolve` run")
    if not path.is_file():
        what = "holds a run that has not finished a generation yet" if (run_dir / CONFIG).is_file() \
            else "is not a kecompress run directory"
        raise KecompressError(f"{run_dir} {what} (no {METRICS}): pass the --out directory of a "
                              "`kecompress evolve` run, after its first generation")
    try:
        records = json.loads(path.read_text())["generations"]
        if not records or not all(isinstance(record, dict) and "generation" in record for record in records):
            raise ValueError
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError):
        raise KecompressError(f"{path} is damaged or not written by kecompress: "
                              "it needs {\"generations\": [{\"generation\": 1, ...}, ...]}") from None
    return records


def start_run(run_dir: Path, config: dict, split: Split, source_model: Path | None) -> None:
    """Create ``run_dir`` and write the configuration, the split and the source model copy.

    Example:
        >>> # start_run(Path("runs/a"), config, split, None)
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    if source_model is not None:
        with atomic_path(run_dir / SOURCE_MODEL) as tmp:
            shutil.copyfile(source_model, tmp)
    save_torch(split.to_dict(), run_dir / SPLIT)
    save_json(config, run_dir / CONFIG)


def build_dense(config: dict, run_dir: Path | None = None, trust_file: bool = False) -> nn.Module:
    """The dense architecture of a run, freshly initialised (weights are loaded separately).

    Example:
        >>> build_dense({"arch": "resnet18", "num_classes": 10}).fc.out_features
        10
    """
    if config.get("arch"):
        return build_model(config["arch"], config["num_classes"])
    return load_model_file(Path(run_dir) / SOURCE_MODEL, trust_file=trust_file)


def save_final(run_dir: Path, model: nn.Module, fit: nn.Module | None, split: Split, config: dict,
               example_inputs) -> None:
    """Write the final dense weights and, for KELS, the fit network's recipe and weights.

    ``fit`` is the slim network to keep (``Evolution.fit_network()``, its BatchNorm statistics
    re-estimated or not); None for a WELS split, whose fit has no slim form.

    Example:
        >>> # save_final(Path("runs/a"), model, evolution.fit_network(), split, config, example_inputs)
    """
    save_torch(model.state_dict(), run_dir / DENSE)
    if split.method == "kels":
        save_fit(run_dir / FIT, fit, config, split, tuple(example_inputs.shape[1:]))


def save_fit(path: Path, fit: nn.Module, config: dict, split: Split, input_shape) -> None:
    """Save a slim fit network as a recipe (architecture, split, input shape) plus its weights.

    It reloads with :func:`load_fit` without running code from the file: the architecture is
    rebuilt and re-sliced, then the weights are loaded into it.

    Example:
        >>> # save_fit(Path("fit.pt"), fit, {"arch": "resnet18", "num_classes": 10}, split, (3, 32, 32))
    """
    recipe = {"format": FIT_FORMAT, "arch": config.get("arch"), "num_classes": config.get("num_classes"),
              "method": split.method, "rate": split.rate, "seed": split.seed,
              "input_shape": list(input_shape), "state_dict": fit.state_dict()}
    save_torch(recipe, path)


def load_fit(path: str | Path, dense: nn.Module | None = None) -> nn.Module:
    """Rebuild a fit network saved by :func:`save_fit`.

    Args:
        path: the ``fit.pt`` file.
        dense: the dense architecture, needed only when the run started from a model file
            rather than a torchvision architecture name (its weights do not matter).

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
    if not isinstance(recipe, dict) or recipe.get("format") != FIT_FORMAT:
        raise KecompressError(f"{path} is not a kecompress fit network")
    if dense is None:
        if not recipe["arch"]:
            raise KecompressError(f"{path} was cut from a model file: pass its dense model to load_fit")
        dense = build_model(recipe["arch"], recipe["num_classes"])
    example = torch.zeros(1, *recipe["input_shape"])
    fit = slice_fit(dense, make_split(dense, recipe["method"], recipe["rate"], example_inputs=example,
                                      seed=recipe["seed"]), example_inputs=example)
    try:
        fit.load_state_dict(recipe["state_dict"])
    except RuntimeError:
        raise KecompressError(f"the weights in {path} do not fit the rebuilt network: "
                              "the file does not belong to this architecture") from None
    return fit.eval()


def load_run(run_dir: str | Path, trust_file: bool = False) -> tuple[nn.Module, Split, dict]:
    """The final dense model of a finished run, its split and its configuration.

    Example:
        >>> # dense, split, config = load_run("runs/demo")
    """
    run_dir = Path(run_dir)
    config = read_config(run_dir)
    if not (run_dir / DENSE).is_file():
        raise KecompressError(f"{run_dir} holds no final model ({DENSE}): the run has not finished; "
                              f"finish it with `kecompress evolve ... --out {run_dir} --resume`")
    dense = build_dense(config, run_dir, trust_file)
    try:
        dense.load_state_dict(torch.load(run_dir / DENSE, map_location="cpu", weights_only=True))
    except Exception as error:
        raise KecompressError(f"cannot load {run_dir / DENSE} ({error.__class__.__name__}): "
                              "the file is damaged or from another model") from None
    split = Split.load(run_dir / SPLIT)
    split.check_matches(dense)
    return dense.eval(), split, config
