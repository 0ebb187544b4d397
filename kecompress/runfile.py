"""A run's settings as a file: ``kecompress evolve --config FILE`` reads one, ``--print-config`` writes one.

The file holds :class:`~kecompress.config.RunConfig`'s keys, as a run directory's ``config.json``
does (so that file repeats its run as it is), in JSON or TOML. :func:`evolve_defaults` turns it
into the values of ``evolve``'s options, which the command line then overrides; how a run is
executed (device, precision, compilation, run directory) is not part of it.
"""

from __future__ import annotations

import json
import sys
from dataclasses import fields
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, as a package
    import tomli as tomllib
import tomli_w

from .config import RunConfig, TrainingConfig
from .errors import KecompressError
from .finetune import FitFinetuning

# RunConfig's keys that are evolve's options of another name (the rest are spelt alike).
_OPTION_OF = {"split": "split_method"}
_TRAINING_OPTION_OF = {"generations": "generations", "epochs": "epochs", "lr": "lr", "weight_decay": "weight_decay",
                       "warmup_epochs": "warmup_epochs", "target": "target_accuracy"}
_DISTILL_OPTION_OF = {"temperature": "distill_temperature", "weight": "distill_weight",
                      "label_weight": "distill_label_weight", "start_generation": "distill_start",
                      "ramp_epochs": "distill_ramp"}
_FORGET_OPTION_OF = {"name": "forget", "start": "forget_from", "shrink": "shrink", "perturb": "perturb"}
# Written by a run, derived from the data and the launch: read, not options.
_RECORDED = ("arch", "classes", "world_size")


def read_run_file(path: str | Path) -> dict:
    """The settings in a JSON or TOML file (TOML for a ``.toml`` name, JSON otherwise).

    Example:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "run.toml"
        >>> _ = path.write_text('model = "resnet18"\\nrate = 0.25\\n[training]\\nepochs = 3\\n')
        >>> read_run_file(path)
        {'model': 'resnet18', 'rate': 0.25, 'training': {'epochs': 3}}
    """
    path = Path(path)
    try:
        text = path.read_text()
    except (FileNotFoundError, IsADirectoryError):
        raise KecompressError(f"--config {path}: no such file: pass a run's config.json or a TOML or JSON file "
                              "that kecompress evolve ... --print-config wrote") from None
    try:
        values = tomllib.loads(text) if path.suffix.lower() == ".toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as error:
        kind = "TOML" if path.suffix.lower() == ".toml" else "JSON (name a TOML file .toml)"
        raise KecompressError(f"--config {path} is not valid {kind}: {error}") from None
    if not isinstance(values, dict):
        raise KecompressError(f"--config {path} holds a {type(values).__name__}, not settings: "
                              'write an object of settings, e.g. {"model": "resnet18", "rate": 0.5}')
    return values


def evolve_defaults(values: dict, where: str | Path) -> dict:
    """``evolve``'s option values (by parameter name) that the settings ``values`` of file ``where`` record.

    A run's own record (``config.json``, which names its ``arch``) takes, for a setting it lacks,
    the value runs had before the setting existed, as a resumed run does; a hand-written file
    takes the command line's default. A setting the command line cannot reproduce is refused.

    Example:
        >>> evolve_defaults({"model": "resnet18", "split": "wels", "training": {"epochs": 3}}, "run.toml")
        {'model': 'resnet18', 'split_method': 'wels', 'epochs': 3}
        >>> evolve_defaults({"model": "resnet18", "rtae": 0.5}, "run.toml")
        Traceback (most recent call last):
        ...
        kecompress.errors.KecompressError: run.toml: unknown setting 'rtae': the settings are config.json's (model, split, rate, data, batch_size, ...; training.epochs, training.lr, ...): see kecompress evolve MODEL --print-config
    """
    known = [item.name for item in fields(RunConfig)]
    _refuse_unknown(values, [*known, *_RECORDED], where)
    _refuse_unknown(values.get("training") or {}, [item.name for item in fields(TrainingConfig)], where, "training.")
    if "arch" in values:  # a run's config.json, perhaps of an earlier version
        values = {**RunConfig._LEGACY, **values}
        if values.get("data") and "augment" not in values:
            values.update(augment="resized-crop", crop_scale=[0.08, 1.0])
    if values.get("loaders", "kecompress") != "kecompress":
        raise KecompressError(f"{where} records a run made from Python with data loaders of its own, which the "
                              "command line cannot rebuild: repeat it from Python")
    _refuse_unlike_the_command_line(values, where)
    options = {}
    for key, value in values.items():
        if key in _RECORDED or key in ("training", "forget", "distill_fit", "finetune_fit", "loaders", "metric"):
            continue
        if key == "crop_scale" and value is not None:
            value = tuple(value)
        options[_OPTION_OF.get(key, key)] = value
    training = values.get("training") or {}
    options.update({_TRAINING_OPTION_OF[key]: value for key, value in training.items() if key in _TRAINING_OPTION_OF})
    options.update({_FORGET_OPTION_OF[key]: value for key, value in (values.get("forget") or {}).items()})
    if "distill_fit" in values:
        options["distill_fit"] = values["distill_fit"] is not None
        options.update({_DISTILL_OPTION_OF[key]: value for key, value in (values["distill_fit"] or {}).items()})
    if "finetune_fit" in values:
        options["finetune_fit"] = (values["finetune_fit"] or {"epochs": 0})["epochs"]
    return {name: value for name, value in options.items() if value is not None}  # None: the option's default


def run_file_text(config: RunConfig, as_toml: bool = True) -> str:
    """``config`` as ``evolve --config`` reads it, in TOML or JSON. Unset (None) settings are left
    out: the command line's default is None for each of them.

    Example:
        >>> print(run_file_text(RunConfig(model="resnet18")).splitlines()[0])
        model = "resnet18"
    """
    values = _without_none(config.to_json())
    values.pop("arch", None)  # derived from model
    if config.training.target is not None:  # not the run's identity, but the user asked for it
        values["training"]["target"] = config.training.target
    return tomli_w.dumps(values) if as_toml else json.dumps(values, indent=2) + "\n"


def _refuse_unknown(values: dict, known: list[str], where, prefix: str = "") -> None:
    if not isinstance(values, dict):
        raise KecompressError(f"{where}: {prefix.rstrip('.')} holds {values!r}, not settings: write a table of "
                              "settings, e.g. [training] epochs = 10")
    for key in values:
        if key not in known:
            raise KecompressError(f"{where}: unknown setting '{prefix}{key}': the settings are config.json's "
                                  "(model, split, rate, data, batch_size, ...; training.epochs, training.lr, ...): "
                                  "see kecompress evolve MODEL --print-config")


def _refuse_unlike_the_command_line(values: dict, where) -> None:
    """Settings of a Python run that the command line's options cannot set."""
    training = values.get("training") or {}
    fixed = {"metric": (values.get("metric", "accuracy"), "accuracy"),
             "training.momentum": (training.get("momentum", TrainingConfig.momentum), TrainingConfig.momentum),
             "training.seed": (training.get("seed", values.get("seed", 0)), values.get("seed", 0))}
    finetune = values.get("finetune_fit")
    if finetune:
        recorded = FitFinetuning(finetune.get("epochs", 1)).identity()
        fixed.update({f"finetune_fit.{key}": (finetune.get(key, recorded[key]), recorded[key])
                      for key in ("temperature", "kd_weight")})
    distill = values.get("distill_fit")
    if distill:
        unknown = set(distill) - set(_DISTILL_OPTION_OF)
        if unknown:
            raise KecompressError(f"{where}: unknown setting 'distill_fit.{sorted(unknown)[0]}': distill_fit takes "
                                  f"{', '.join(_DISTILL_OPTION_OF)}")
    forget = values.get("forget") or {}
    if set(forget) - set(_FORGET_OPTION_OF):
        raise KecompressError(f"{where}: forget = {forget!r} is not one of kecompress's strategies with the "
                              "command line's settings: repeat it from Python")
    for name, (value, command_line) in fixed.items():
        if value != command_line:
            raise KecompressError(f"{where}: {name} = {value!r}, which the command line cannot set (it uses "
                                  f"{command_line!r}): repeat this run from Python with kecompress.experiment.build")


def _without_none(values: dict) -> dict:
    return {key: _without_none(value) if isinstance(value, dict) else value
            for key, value in values.items() if value is not None}

