"""Getting a model: a torchvision architecture by name, a timm one as ``timm:NAME``, or a
whole-module file loaded safely.

A file written by ``torch.save(model)`` is a pickle, and unpickling can run any code the file
names. :func:`load_model_file` therefore loads with ``weights_only=True`` and an allowlist of
the layer classes of ``torch.nn``, ``torchvision.models`` and ``torchvision.ops`` only; a file
that needs anything else is refused unless the caller trusts it explicitly.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import pickle
import re
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torchvision

from .errors import KecompressError
from .evaluation import eval_mode

MODEL_FILE_SUFFIXES = (".pt", ".pth")
TIMM_PREFIX = "timm:"
TIMM_INSTALL = "pip install 'kecompress[timm]'"

# The packages whose nn.Module subclasses a whole-module file may name without being trusted.
_SAFE_MODULE_PACKAGES = ("torch.nn.modules", "torchvision.models", "torchvision.ops")

# googlenet and inception_v3 default to auxiliary heads that make the training-mode output a
# tuple, and to a custom initialisation that differs from the layers' own, which KE re-uses for
# every reset; turn both off so they behave like every other classifier.
_ARCH_OPTIONS = {
    "googlenet": {"aux_logits": False, "init_weights": False},
    "inception_v3": {"aux_logits": False, "init_weights": False},
}


def classification_architectures() -> list[str]:
    """The torchvision classification architectures :func:`build_model` accepts.

    Example:
        >>> "resnet18" in classification_architectures()
        True
    """
    return torchvision.models.list_models(module=torchvision.models)


def build_model(arch: str, num_classes: int, image_size: int | None = None) -> nn.Module:
    """A randomly initialised classifier, torchvision's or timm's; never downloads weights.

    Args:
        arch: a name from ``torchvision.models.list_models(module=torchvision.models)``,
            e.g. ``"resnet18"``, or ``"timm:NAME"`` for a timm model (:func:`build_timm_model`).
        num_classes: the number of outputs (classes) of the final layer.
        image_size: the input's height and width, for timm models built for one size only
            (vision transformers); torchvision's are built as they are.

    Raises:
        KecompressError: an unknown architecture (with close matches) or a bad class count.

    Example:
        >>> build_model("resnet18", num_classes=7).fc.out_features
        7
    """
    if not isinstance(num_classes, int) or num_classes < 1:
        raise KecompressError(f"num_classes must be a positive integer, got {num_classes!r}: "
                              "pass the number of classes in the data, e.g. 10")
    if arch.startswith(TIMM_PREFIX):
        return build_timm_model(arch[len(TIMM_PREFIX):], num_classes, image_size)
    known = classification_architectures()
    if arch not in known:
        close = difflib.get_close_matches(arch, known, n=4, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise KecompressError(
            f"unknown architecture {arch!r}: {hint}any name from "
            "torchvision.models.list_models(module=torchvision.models) is accepted, e.g. resnet18, "
            f"a timm model as {TIMM_PREFIX}NAME, or a .pt/.pth file holding a whole model")
    return torchvision.models.get_model(arch, weights=None, num_classes=num_classes,
                                        **_ARCH_OPTIONS.get(arch, {}))


def build_timm_model(name: str, num_classes: int, image_size: int | None = None) -> nn.Module:
    """A randomly initialised timm classifier: ``timm.create_model(name, pretrained=False, ...)``.

    timm is an optional dependency (``pip install 'kecompress[timm]'``). A model that timm
    builds for one input size only (``fixed_input_size`` in its configuration: the vision
    transformers, whose position embedding has one entry a patch) is built for ``image_size``
    when that differs from its default.

    Args:
        name: a name from ``timm.list_models()``, e.g. ``"resnet18d"``, without a pretrained tag.
        num_classes: the number of outputs (classes) of the classifier.
        image_size: the input's height and width (None: the model's default).

    Raises:
        KecompressError: timm is not installed, the name is unknown (with close matches) or
            carries a pretrained tag, or timm cannot build the model with these settings.

    Example:
        >>> build_timm_model("resnet10t", num_classes=5).fc.out_features
        5
        >>> build_timm_model("vit_tiny_patch16_224", num_classes=5, image_size=32).patch_embed.img_size
        (32, 32)
    """
    if not name:
        raise KecompressError(f"{TIMM_PREFIX} names no model: add a name from timm.list_models(), "
                              f"e.g. {TIMM_PREFIX}resnet18d")
    timm = _import_timm(name)
    if "." in name:
        raise KecompressError(f"{TIMM_PREFIX}{name} names pretrained weights (the tag after the dot); kecompress "
                              f"builds timm models untrained: drop the tag, e.g. {TIMM_PREFIX}{name.split('.')[0]}")
    if not timm.is_model(name):
        # Names that start with it (a family), else contain it, else are spelt alike.
        close = (timm.list_models(f"{name}*") or timm.list_models(f"*{name}*"))[:4] \
            or difflib.get_close_matches(name, timm.list_models(), n=4, cutoff=0.6)
        hint = f"did you mean {', '.join(TIMM_PREFIX + candidate for candidate in close)}? " if close else ""
        raise KecompressError(f"unknown timm model {name!r}: {hint}any name from timm.list_models() is accepted, "
                              f"e.g. {TIMM_PREFIX}resnet18d")
    options = {}
    config = timm.models.get_pretrained_cfg(name, allow_unregistered=True)
    if image_size and config is not None and config.fixed_input_size and config.input_size[-1] != image_size:
        options["img_size"] = image_size
    try:
        return timm.create_model(name, pretrained=False, num_classes=num_classes, **options)
    except Exception as error:  # timm reports a bad setting by many exception types
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        size = f" and {options['img_size']} px images" if options else ""
        raise KecompressError(f"timm cannot build {name} for {num_classes} classes{size} ({reason}): "
                              "choose another model or input size") from None


def _import_timm(name: str):
    try:
        return importlib.import_module("timm")
    except ImportError:
        raise KecompressError(f"{TIMM_PREFIX}{name} needs timm, which is not installed: {TIMM_INSTALL}") from None


@functools.lru_cache(maxsize=1)
def safe_model_globals() -> tuple:
    """The classes and functions a whole-module file may name when loaded without trust.

    Every ``nn.Module`` subclass defined in ``torch.nn.modules``, ``torchvision.models`` or
    ``torchvision.ops`` (all imported by ``import torchvision``), and ``functools.partial``,
    which torchvision's vision transformers keep as their ``norm_layer``. Unpickling may call
    these with arguments from the file; none of them runs code named by the file.

    Example:
        >>> torch.nn.Conv2d in safe_model_globals()
        True
    """
    classes = {
        value
        for name, module in list(sys.modules.items())
        if name.startswith(_SAFE_MODULE_PACKAGES) and module is not None
        for value in vars(module).values()
        if isinstance(value, type) and issubclass(value, nn.Module)
        and value.__module__.startswith(_SAFE_MODULE_PACKAGES)
    }
    return (functools.partial, *sorted(classes, key=lambda cls: f"{cls.__module__}.{cls.__qualname__}"))


def load_model_file(path: str | Path, trust_file: bool = False) -> nn.Module:
    """Load a whole model saved with ``torch.save(model)``, on the CPU.

    Without ``trust_file`` the file is unpickled with ``weights_only=True`` and only the
    classes of :func:`safe_model_globals`, so loading it cannot run code from the file. That
    covers every torchvision classifier and the slim networks kecompress cuts out of them, saved
    in torch's default (zip) format; the legacy format written with
    ``_use_new_zipfile_serialization=False`` embeds source code and needs ``trust_file``.
    A hostile file can still describe a strange or huge model, only not run code of its own.

    Args:
        path: a ``.pt``/``.pth`` file holding an ``nn.Module``.
        trust_file: unpickle with full pickle (``weights_only=False``), which runs whatever code
            the file names: only for files from a source you trust.

    Raises:
        KecompressError: a missing, empty or damaged file; a file that needs classes outside the
            allowlist (without ``trust_file``); a state_dict or another object that is not a model.

    Example:
        >>> import os, tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "net.pt")
        >>> torch.save(torch.nn.Sequential(torch.nn.Linear(4, 2)), path)
        >>> load_model_file(path)
        Sequential(
          (0): Linear(in_features=4, out_features=2, bias=True)
        )
    """
    path = Path(path)
    if not path.exists():
        raise KecompressError(f"model file {path} does not exist: check the path, or pass an "
                              "architecture name such as resnet18")
    if path.is_dir():
        raise KecompressError(f"model file {path} is a directory: pass a .pt/.pth file "
                              "written by torch.save(model)")
    if path.stat().st_size == 0:
        raise KecompressError(f"model file {path} is empty: save the model again with torch.save(model)")
    loaded = _trusted_load(path) if trust_file else _safe_load(path)
    return _as_model(loaded, path)


def _safe_load(path: Path):
    try:
        with torch.serialization.safe_globals(list(safe_model_globals())):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        offending = re.search(r"GLOBAL ([\w.]+)", str(error))
        if offending:
            raise KecompressError(
                f"model file {path} names {offending.group(1)}, code outside torch.nn and torchvision "
                "that would run on load: pass --trust-model-file (trust_file=True) to load it with full "
                "pickle, only if you trust the file's source") from None
        reason = _weights_only_reason(error)
        raise KecompressError(
            f"model file {path} cannot be loaded without running code from it ({reason}): "
            "it is damaged or in a format only full pickle reads, such as the legacy non-zip one; "
            "pass --trust-model-file only if you trust the file's source") from None
    except Exception as error:  # torch.load reports a damaged file by many exception types
        raise _damaged(path, error) from error


def _trusted_load(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (ImportError, AttributeError) as error:
        raise KecompressError(f"model file {path} needs code that cannot be imported here ({error}): "
                              "import or install the module that defines the model first") from error
    except Exception as error:
        raise _damaged(path, error) from error


def _weights_only_reason(error: pickle.UnpicklingError) -> str:
    # torch wraps the unpickler's own complaint in paragraphs of general advice; keep the complaint.
    detail = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n\n|$)", str(error), re.DOTALL)
    return " ".join(detail.group(1).split()) if detail else "unsupported pickle content"


def _damaged(path: Path, error: Exception) -> KecompressError:
    # torch's messages run to several sentences; the first one names the problem.
    reason = str(error).splitlines()[0].split(". ")[0] if str(error) else type(error).__name__
    return KecompressError(f"model file {path} is not a readable torch.save file ({reason}): "
                           "it may be truncated or corrupt; save or copy it again")


def _as_model(loaded, path: Path) -> nn.Module:
    if isinstance(loaded, nn.Module):
        return loaded
    if isinstance(loaded, dict) and loaded and all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise KecompressError(
            f"model file {path} holds a state_dict, not a whole model: pass the architecture name "
            "instead, e.g. resnet18, and load the weights into it, or save the model with torch.save(model)")
    raise KecompressError(f"model file {path} holds a {type(loaded).__name__}, not an nn.Module: "
                          "save the model itself with torch.save(model)")


def is_model_file(spec: str) -> bool:
    """Whether a model argument names a file (an existing path, or ``.pt``/``.pth``) rather
    than an architecture (torchvision's, or timm's as ``timm:NAME``).

    Example:
        >>> is_model_file("resnet18"), is_model_file("net.pt")
        (False, True)
    """
    return Path(spec).exists() or spec.endswith(MODEL_FILE_SUFFIXES)


def resolve_model(spec: str, num_classes: int | None, trust_file: bool = False,
                  image_size: int | None = None) -> nn.Module:
    """A model from a command-line style spec: a model file, a torchvision architecture name, or
    ``timm:NAME``.

    A spec that is an existing path or ends in ``.pt``/``.pth`` is loaded with
    :func:`load_model_file`; anything else is built with :func:`build_model` (for
    ``image_size``, see there).

    Example:
        >>> resolve_model("resnet18", num_classes=3).fc.out_features
        3
        >>> resolve_model("timm:resnet10t", num_classes=3).fc.out_features
        3
    """
    if is_model_file(spec):
        return load_model_file(spec, trust_file=trust_file)
    if num_classes is None:
        raise KecompressError(f"building {spec!r} needs the number of classes: pass --num-classes "
                              "or data to infer it from")
    return build_model(spec, num_classes, image_size)


def output_features(model: nn.Module, example_input: torch.Tensor) -> int:
    """The number of outputs (classes) of a classifier, found by running it on one example.

    The model runs in eval mode without gradients, so BatchNorm statistics are untouched, and
    is put back in the mode it was in.

    Args:
        model: a classifier returning a ``(batch, classes)`` tensor.
        example_input: an input batch; only its first item is used.

    Raises:
        KecompressError: the model cannot run on the input, or does not return class scores.

    Example:
        >>> output_features(build_model("resnet18", 7), torch.zeros(1, 3, 32, 32))
        7
    """
    try:
        with torch.no_grad(), eval_mode(model):
            output = model(example_input[:1])
    except Exception as error:  # a shape or dtype mismatch surfaces as any of several types
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise KecompressError(f"the model cannot run on inputs of shape {tuple(example_input.shape[1:])} "
                              f"({reason}): pick an --image-size (--input-size) the architecture accepts, "
                              "e.g. 224") from error
    if not isinstance(output, torch.Tensor) or output.dim() != 2:
        kind = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise KecompressError(f"the model returns {kind}, not (batch, classes) scores: "
                              "kecompress trains classifiers that return one tensor of logits")
    return output.shape[1]
