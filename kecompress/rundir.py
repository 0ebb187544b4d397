"""The run directory: every file a run writes, and how each is written and read back.

    config.json     the run's configuration (:class:`~kecompress.config.RunConfig`)
    split.pt        the split's masks (plain tensors)
    checkpoint.pt   model, optimizer, schedule, RNG, progress: a resumed run continues here
    checkpoint.previous.pt  the checkpoint before it (rotated, never rewritten in place): a resume
                    falls back on it when checkpoint.pt is damaged
    manifest.json   the SHA-256 of every file above and below but the chart (:mod:`kecompress.manifest`),
                    checked whenever one is read
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
atomically and recorded in the manifest, one process writes at a time (:mod:`kecompress.runlock`),
and nothing is read with code execution unless the user opted in for the model file the run
started from. Readers (``report``, ``info``, ``export``, ``bench``) need no lock: every file they
read is whole and checked against the manifest, read again when a write lands meanwhile.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import warnings
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn as nn

from . import manifest, runlock
from .config import RunConfig, TrainingConfig
from .edge_popup import EDGE_POPUP_METHODS, plain_network, scores_split
from .errors import KecompressError
from .files import atomic_path, save_torch, torch_bytes
from .forgetting import describe
from .models import build_model, load_model_file
from .records import FinetuneRecord, GenerationRecord, metric_of
from .slim import fit_shaped, fit_sized, slice_fit
from .split import Split, block_mask, default_example_inputs, has_grouped_convs, kept_indices, split as make_split

# /2 records the fit channels of every parameter; /1 only the split's method, rate and seed (the rate rule).
FIT_FORMAT, RATE_RULE_FIT_FORMAT = "kecompress-fit/2", "kecompress-fit/1"


class RunNote(UserWarning):
    """A one-line note on a run directory: read without checksums, or resumed from its previous checkpoint.

    The command line prints it as ``kecompress: note: ...``.

    Example:
        >>> issubclass(RunNote, UserWarning)
        True
    """


class RunDirectory:
    """One run directory: the names of its files, and how each is written and read.

    Example:
        >>> RunDirectory("runs/demo").metrics_file.name
        'metrics.json'
    """

    CONFIG, SPLIT, CHECKPOINT, METRICS = "config.json", "split.pt", "checkpoint.pt", "metrics.json"
    CHART, DENSE, FIT, SOURCE_MODEL, ONNX = "generations.png", "dense.pt", "fit.pt", "source_model.pt", "onnx"
    SHAPE = "shape.pt"  # fit-only runs of a learned or borrowed shape: the split of the source that gives it
    PREVIOUS_CHECKPOINT, DAMAGED_CHECKPOINT = "checkpoint.previous.pt", "checkpoint.damaged.pt"

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._noted: set[str] = set()

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
    previous_checkpoint_file = property(lambda self: self.path / self.PREVIOUS_CHECKPOINT)

    def is_run(self) -> bool:
        """Whether a run was started here (its configuration is written)."""
        return self.config_file.is_file()

    def is_free(self) -> bool:
        """Whether a new run may start here: the directory is empty but for what a new run killed
        before it wrote its configuration leaves (files its manifest lists, the manifest, the lock,
        temporary files), which it rewrites.

        Example:
            >>> RunDirectory("runs/never-written").is_free()
            True
        """
        if not self.path.is_dir():
            return True
        if self.is_run():
            return False
        try:
            listed = manifest.read(self.path) or {}
        except ValueError:
            return False
        return all(entry.name in listed or entry.name in (manifest.MANIFEST, runlock.LOCK_FILE)
                   or (entry.name.startswith(".") and entry.name.endswith(".tmp")) for entry in self.path.iterdir())

    # -- the start: configuration, split, the model it started from ---------------------------
    def start(self, config: RunConfig, split: Split, source_model: str | Path | nn.Module | None = None) -> None:
        """Create the directory and write the configuration, the split and, for a model that is
        no architecture built by name, the model it starts from (a file is copied, a module saved whole).

        Example:
            >>> # RunDirectory("runs/a").start(config, split, model)
        """
        self.path.mkdir(parents=True, exist_ok=True)
        if isinstance(source_model, nn.Module):
            self._write(self.SOURCE_MODEL, torch_bytes(source_model))
        elif source_model is not None:
            self._write(self.SOURCE_MODEL, Path(source_model).read_bytes())
        self._write(self.SPLIT, torch_bytes(split.to_dict()))
        self._write(self.CONFIG, _json_bytes(config.to_json()))

    def read_config(self) -> RunConfig:
        """The run's configuration.

        Example:
            >>> # RunDirectory("runs/demo").read_config().split
        """
        try:
            data = self.read_verified(self.CONFIG)
        except FileNotFoundError:
            raise KecompressError(f"{self.path} is not a kecompress run directory (no {self.CONFIG}): "
                                  "pass the --out directory of a `kecompress evolve` run") from None
        try:
            return RunConfig.from_json(json.loads(data))
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError, KecompressError):
            raise KecompressError(f"{self.config_file} is damaged (not a run configuration): "
                                  "the run directory cannot be used") from None

    def read_split(self) -> Split:
        """The split the run was made with (chosen by importance: the one chosen)."""
        if self.split_file.is_file():
            self.read_verified(self.SPLIT)  # what is checked is what is loaded
        return Split.load(self.split_file)

    def write_split(self, split: Split) -> None:
        """Replace the run's split: a split chosen by importance during the run (``--select-after``)."""
        self._write(self.SPLIT, torch_bytes(split.to_dict()))

    def write_shape(self, shaping: Split) -> None:
        """Record the split of the source architecture whose fit gives a fit-only run its shape."""
        self._write(self.SHAPE, torch_bytes(shaping.to_dict()))

    def read_shape(self) -> Split | None:
        """The split that gives a fit-only run its shape, when it was learned or borrowed; None for the rate rule."""
        if not self.shape_file.is_file():
            return None
        self.read_verified(self.SHAPE)  # what is checked is what is loaded
        return Split.load(self.shape_file)

    def check_same_run(self, config: RunConfig, model: nn.Module | None = None) -> None:
        """Refuse to continue this run with ``config`` unless it is the same run (one line naming
        what differs). A directory the Python API of an earlier version wrote has no
        ``config.json``: its checkpoint's settings are compared instead. Given the run's ``model``,
        how grouped convolutions are cut is compared only where it has some.

        Example:
            >>> # RunDirectory("runs/a").check_same_run(config)
        """
        if self.is_run():
            try:
                saved = self.read_config()
            except manifest.DamagedFile:
                if not self.repair(self.CONFIG, _json_bytes(config.to_json())):
                    raise
                saved = config
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
        """Write ``checkpoint.pt``; the one it replaces becomes ``checkpoint.previous.pt``."""
        self._write(self.CHECKPOINT, torch_bytes(state), rotate_to=self.PREVIOUS_CHECKPOINT)

    def read_checkpoint(self, set_aside_damaged: bool = False) -> dict | None:
        """The last intact checkpoint (plain tensors and numbers, read with ``weights_only``), or None.

        When ``checkpoint.pt`` is damaged (or missing: killed while rotating), the previous one,
        with a :class:`RunNote`; ``set_aside_damaged`` (the writer, resuming) renames the damaged one
        ``checkpoint.damaged.pt``, so that the next checkpoint does not rotate it over the good one.

        Example:
            >>> RunDirectory("runs/never-written").read_checkpoint() is None
            True
        """
        newest_error = None
        for name in (self.CHECKPOINT, self.PREVIOUS_CHECKPOINT):
            if not (self.path / name).is_file():
                continue
            try:
                state = torch.load(io.BytesIO(self.read_verified(name)), map_location="cpu", weights_only=True)
            except Exception as error:
                if name == self.PREVIOUS_CHECKPOINT and newest_error is not None:
                    raise KecompressError(f"cannot resume from {self.checkpoint_file} nor from the checkpoint before "
                                          f"it, {self.previous_checkpoint_file}: both are damaged "
                                          f"({newest_error.__class__.__name__}, {error.__class__.__name__}); start a "
                                          "new run with another --out") from None
                if name == self.CHECKPOINT:
                    newest_error = error
                    continue
                raise self.unusable_checkpoint(error, self.previous_checkpoint_file) from None
            if name == self.PREVIOUS_CHECKPOINT:
                self._fell_back(newest_error, set_aside_damaged)
            elif set_aside_damaged:
                self._check_previous_checkpoint()
            return state
        if newest_error is not None:
            if not self._was_first_checkpoint():
                raise self.unusable_checkpoint(newest_error) from None
            self._fell_back(newest_error, set_aside_damaged, "the start of the run")
        return None

    def _was_first_checkpoint(self) -> bool:
        # Every checkpoint after the first rotates one into checkpoint.previous.pt, which the manifest then lists.
        files = self._manifest_for_writing()
        return self.CHECKPOINT in files and self.PREVIOUS_CHECKPOINT not in files

    def _check_previous_checkpoint(self) -> None:
        # Not read when the newest is whole, but a resume says when the one to fall back on is gone.
        try:
            self.previous_checkpoint_file.is_file() and self.read_verified(self.PREVIOUS_CHECKPOINT)
        except manifest.DamagedFile:
            self._note(f"{self.previous_checkpoint_file} is damaged (its SHA-256 differs from the manifest's): "
                       "not needed now, and the run's next checkpoint replaces it")

    def _fell_back(self, newest_error: Exception | None, set_aside_damaged: bool, to: str | None = None) -> None:
        to = to or f"{self.previous_checkpoint_file}, the checkpoint before it"
        if newest_error is None:
            self._note(f"{self.checkpoint_file} is missing (the run was killed while replacing it): resuming from {to}")
            return
        why = "its SHA-256 differs from the manifest's" if isinstance(newest_error, manifest.DamagedFile) \
            else f"unreadable: {newest_error.__class__.__name__}"
        kept = ""
        if set_aside_damaged:
            os.replace(self.checkpoint_file, self.path / self.DAMAGED_CHECKPOINT)
            files = self._manifest_for_writing()
            files.pop(self.CHECKPOINT, None)
            self._write_manifest(files)
            kept = f"; the damaged file is kept as {self.DAMAGED_CHECKPOINT}"
        self._note(f"{self.checkpoint_file} is damaged ({why}): resuming from {to}, at most one checkpoint interval "
                   f"earlier{kept}")

    def unusable_checkpoint(self, error: Exception, path: Path | None = None) -> KecompressError:
        """The error for a checkpoint that cannot be read, or loaded into the run's model."""
        if isinstance(error, manifest.DamagedFile):
            return KecompressError(f"{error.path} is damaged (its SHA-256 differs from the manifest's) and there is "
                                   "no intact checkpoint before it: start a new run with another --out")
        return KecompressError(f"cannot resume from {path or self.checkpoint_file} ({error.__class__.__name__}): "
                               "the checkpoint is damaged or from another model; start a new run with another --out")


    def write_metrics(self, records: list[GenerationRecord], finetune: FinetuneRecord | None = None) -> None:
        metric = records[0].metric if records else None
        content = {"metric": metric, "generations": [record.to_json() for record in records]}
        if finetune is not None:
            content["finetune"] = finetune.to_json()
        self._write(self.METRICS, _json_bytes(content))

    def read_finetune(self) -> FinetuneRecord | None:
        """The record of the fit's fine-tuning, when the run fine-tuned it (after :meth:`read_metrics`).

        Example:
            >>> # RunDirectory("runs/demo").read_finetune().fit
        """
        content = json.loads(self.read_verified(self.METRICS))
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
            content = json.loads(self.read_verified(self.METRICS))
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
            split = scores_split(model, split.rate, split.seed)
            self._write(self.SPLIT, torch_bytes(split.to_dict()))
            model = plain_network(model, keep_masked=False)
        self._write(self.DENSE, torch_bytes(model.state_dict()))
        if config.fit_only:  # the fit's channels as the source architecture numbers them, so load_fit rebuilds it
            split = self.read_shape() or make_split(self.build_source(config), "kels", config.rate,
                                                    example_inputs=torch.zeros(1, *input_shape), align=config.align,
                                                    grouped=config.grouped)
        if split.method == "kels":
            self._write(self.FIT, torch_bytes(fit_recipe(fit, config, split, input_shape)))

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
        self.read_verified(self.SOURCE_MODEL)  # written once, at the start: what is checked is what is loaded
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
        data = self.read_verified(self.DENSE)
        try:
            dense.load_state_dict(torch.load(io.BytesIO(data), map_location="cpu", weights_only=True))
        except Exception as error:
            raise KecompressError(f"cannot load {self.dense_file} ({error.__class__.__name__}): "
                                  "the file is damaged or from another model") from None
        split = self.read_split()
        split.check_matches(dense)
        return dense.eval(), split, config

    # -- one writer, checked files -----------------------------------------------------------
    def lock(self) -> None:
        """Hold the writer's lock on the directory (created if missing) until :meth:`unlock`
        (:mod:`kecompress.runlock`); another writer holding it is refused in one line.

        Example:
            >>> # RunDirectory("runs/a").lock()
        """
        runlock.acquire(self.path)

    def unlock(self) -> None:
        """Let go of the writer's lock, when this process holds it.

        Example:
            >>> RunDirectory("runs/never-locked").unlock()
        """
        runlock.release(self.path)

    def read_verified(self, name: str) -> bytes:
        """The bytes of the file ``name``, checked against the manifest; :class:`~kecompress.manifest.DamagedFile`
        (one line naming it) when they are not what was written. A file the manifest does not list
        (a directory of an earlier version) is read unchecked, with a :class:`RunNote`.

        Example:
            >>> # json.loads(RunDirectory("runs/demo").read_verified("metrics.json"))
        """
        path = self.path / name
        for _ in range(3):  # a reader racing the writer: a file and the manifest renamed between two reads
            files = self._manifest_for_reading()
            data = path.read_bytes()
            record = (files or {}).get(name)
            if record is None or manifest.matches(record, data):
                return data
            if self._manifest_for_reading() == files:
                break
        raise manifest.DamagedFile(path, self._fix(name))

    def repair(self, name: str, data: bytes) -> bool:
        """Rewrite the damaged file ``name`` with ``data``, made again from the run's settings, when
        they are the very bytes the manifest recorded; False (nothing written) otherwise.

        Example:
            >>> RunDirectory("runs/never-written").repair("config.json", b"{}")
            False
        """
        record = self._manifest_for_writing().get(name) if self.path.is_dir() else None
        if record is None or manifest.digest(data) != record["sha256"]:
            return False
        self._write(name, data)
        self._note(f"{self.path / name} was damaged: made again from the run's settings, byte for byte the file "
                   "that was written (its SHA-256 matches the manifest's)")
        return True

    def check_other_files(self, config: RunConfig) -> None:
        """On resume, name each damaged file that the run does not read to go on: the metrics and the
        final networks (the resumed run writes them again) and the model file it started from (made
        again from ``config.model`` when that file is unchanged).

        Example:
            >>> RunDirectory("runs/never-written").check_other_files(RunConfig())
        """
        for name in (self.METRICS, self.DENSE, self.FIT, self.SOURCE_MODEL):
            try:
                (self.path / name).is_file() and self.read_verified(name)
            except manifest.DamagedFile:
                if name != self.SOURCE_MODEL:
                    self._note(f"{self.path / name} is damaged (its SHA-256 differs from the manifest's): the resumed "
                               "run writes it again")
                elif not (config.model and Path(config.model).is_file()
                          and self.repair(name, Path(config.model).read_bytes())):
                    self._note(f"{self.path / name} is damaged (its SHA-256 differs from the manifest's): copy the "
                               "model file the run started from over it before `kecompress export`")

    def _fix(self, name: str) -> str:
        if name in (self.DENSE, self.FIT, self.METRICS):
            return f"rewrite it from the last checkpoint with `kecompress evolve ... --out {self.path} --resume`"
        if name == self.SOURCE_MODEL:
            return "copy the model file the run started from over it"
        return "the run cannot go on without it: restore it from a backup, or start a new run with another --out"

    def _manifest_for_reading(self) -> dict | None:
        try:
            files = manifest.read(self.path)
        except ValueError:
            self._note(f"{self.path / manifest.MANIFEST} is damaged: the files of {self.path} are read without "
                       "checksums (the run writes a new manifest as it goes on)")
            return None
        if files is None and self.is_run():
            self._note(f"{self.path} has no {manifest.MANIFEST} (an earlier version wrote it): its files are read "
                       "without checksums")
        return files

    def _manifest_for_writing(self) -> dict:
        try:
            return manifest.read(self.path) or {}
        except ValueError:
            return {}  # damaged: the files written from now on are listed again

    def _write_manifest(self, files: dict) -> None:
        with atomic_path(self.path / manifest.MANIFEST) as tmp:
            tmp.write_bytes(manifest.encode(files))

    def _write(self, name: str, data: bytes, rotate_to: str | None = None) -> None:
        """Write ``data`` as the file ``name`` atomically, recorded in the manifest before and after
        its rename (:mod:`kecompress.manifest`); with ``rotate_to``, the file it replaces is renamed so.
        A failed write (a full disk, an I/O error) leaves the files and the manifest as they were."""
        path = self.path / name
        files = self._manifest_for_writing()
        old = files.get(name)
        committed = {**files, name: manifest.entry(data)}
        try:
            with atomic_path(path) as tmp:
                tmp.write_bytes(data)
                intent = {**files, name: manifest.entry(data, replaces=old)}
                rotating = rotate_to is not None and path.exists()
                if rotating:  # the old file keeps its digest under its new name; unknown, it goes unchecked
                    committed.pop(rotate_to, None)
                    intent.pop(rotate_to, None)
                    if old is not None:
                        committed[rotate_to] = {"sha256": old["sha256"], "bytes": old["bytes"]}
                        intent[rotate_to] = {**committed[rotate_to], **({"replaces": files[rotate_to]["sha256"]}
                                                                         if rotate_to in files else {})}
                self._write_manifest(intent)
                if rotating:
                    os.replace(path, self.path / rotate_to)
            self._write_manifest(committed)
        except OSError as error:
            raise self._write_failed(path, len(data), error) from None

    def _write_failed(self, path: Path, size: int, error: OSError) -> KecompressError:
        try:
            free = f", {shutil.disk_usage(self.path).free / 2**20:.1f} MiB are free there"
        except OSError:
            free = ""
        return KecompressError(f"cannot write {path}: {error.strerror or error}; it needs {size / 2**20:.1f} MiB"
                               f"{free}: free space (or choose another disk), then run again with --resume; the "
                               f"previous checkpoint and {manifest.MANIFEST} are intact")

    def _note(self, message: str) -> None:
        if message not in self._noted:
            self._noted.add(message)
            warnings.warn(RunNote(message), stacklevel=3)


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
    save_torch(fit_recipe(fit, config, split, input_shape), path)


def fit_recipe(fit: nn.Module, config: RunConfig, split: Split, input_shape) -> dict:
    """What :func:`save_fit` writes: the architecture, the split's fit channels, the input shape and the weights.

    Example:
        >>> # fit_recipe(fit, RunConfig(model="resnet18", num_classes=10), split, (3, 32, 32))["format"]
    """
    fit_channels = {name: kept_indices(mask) for name, mask in split.masks.items()}
    return {"format": FIT_FORMAT, "arch": config.arch, "num_classes": config.num_classes,
            "method": split.method, "rate": split.rate, "seed": split.seed, "align": split.align, "grouped": split.grouped,
            "fit_channels": fit_channels, "input_shape": list(input_shape), "state_dict": fit.state_dict()}


def load_fit(path: str | Path, dense: nn.Module | None = None) -> nn.Module:
    """Rebuild a fit network saved by :func:`save_fit`.

    Args:
        path: the ``fit.pt`` file.
        dense: the dense architecture, needed only when the run started from a model file
            rather than an architecture name (its weights do not matter).

    Example:
        >>> # fit = load_fit("runs/demo/fit.pt")
    """
    path = Path(path)
    try:  # in a run directory, checked against its manifest
        recipe = torch.load(io.BytesIO(RunDirectory(path.parent).read_verified(path.name)), map_location="cpu",
                            weights_only=True)
    except FileNotFoundError:
        raise KecompressError(f"no fit network at {path}: it is written at the end of a KELS run") from None
    except KecompressError:
        raise
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


def _json_bytes(content) -> bytes:
    return (json.dumps(content, indent=2) + "\n").encode()
