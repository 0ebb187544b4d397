"""KELS and WELS as methods of PyTorch's pruning API (``torch.nn.utils.prune``).

A Knowledge Evolution split divides a network into a fit hypothesis (kept) and a reset
hypothesis (re-initialised). Seen through the pruning API, the fit hypothesis is what is left
after pruning the reset hypothesis, so the usual machinery applies: ``weight_orig`` and
``weight_mask`` in the state dict, ``prune.is_pruned``, ``prune.remove``, a second prune on the
same tensor combined through ``PruningContainer``, and ``prune.global_unstructured`` for WELS.

One convention differs from PyTorch's methods: their ``amount`` is the fraction *pruned*; the
``rate`` here is KE's split rate, the fraction *kept* in the fit hypothesis. ``rate=0.25`` keeps
a quarter, like ``amount=0.75``.

* :class:`KELS` / :func:`kels`: kernel-level, structured, one tensor at a time.
* :class:`WELS` / :func:`wels`: weight-level, unstructured, a seeded Bernoulli draw. The fit is
  sparse, not slim: zeros in a dense tensor run at dense speed.
* :class:`FitMask`, :func:`apply_split`, :func:`remove_split`, :func:`fit_hypothesis`: a whole
  :class:`~kecompress.Split` (graph-consistent masks for every layer) through the same API.

The pruning hook multiplies weight and mask on every forward pass: it is a way to evaluate or
inspect the fit hypothesis, not to run it fast (cut it out with ``kecompress.slice_fit``).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
from torch.nn.utils import prune

from .errors import KecompressError
from .split import check_rate

if TYPE_CHECKING:
    from .split import Split


def kept_fraction(rate=None, amount=None) -> float:
    """The split rate (the fraction kept) from either ``rate`` or PyTorch's ``amount`` (the
    fraction pruned, as ``torch.nn.utils.prune``'s methods take it); exactly one of them.

    Example:
        >>> kept_fraction(rate=0.5), kept_fraction(amount=0.7)
        (0.5, 0.3)
    """
    if (rate is None) == (amount is None):
        raise KecompressError("pass either rate (the fraction kept, KE's split rate) or amount (the fraction "
                              "pruned, PyTorch's convention), not " + ("both" if rate is not None else "neither"))
    if amount is None:
        return check_rate(rate)
    if isinstance(amount, bool) or not isinstance(amount, float) and not (isinstance(amount, int) and amount == 0):
        raise KecompressError(f"amount must be a fraction of the entries to prune in [0, 1), got {amount!r}: "
                              "a count of entries is not supported; e.g. amount=0.5")
    if not 0 <= amount < 1:
        raise KecompressError(f"amount (the fraction pruned) must be in [0, 1), got {amount}: e.g. amount=0.5")
    return round(1 - amount, 12)  # 1 - 0.7 is 0.30000000000000004, which would keep one channel too many


class KELS(prune.BasePruningMethod):
    r"""Kernel-level split of one tensor: keep the first channels, prune the rest.

    For a weight of shape ``(C_out, C_in, *kernel)`` (conv, or linear without a kernel) the fit
    hypothesis is the first ``ceil(rate * C_out)`` output channels and, inside them, the first
    ``ceil(rate * C_in)`` input channels. A 1-D tensor (a bias, a normalisation weight) keeps its
    first ``ceil(rate * C)`` entries. Only positions matter, not the values of the tensor.

    This is the reference implementation's per-layer rule. It knows nothing of channels that
    other layers share (residual adds, concatenations, grouped convolutions):
    :func:`kecompress.split` derives masks that are consistent across a whole model.

    On a tensor that is already pruned, channels entirely pruned before do not count: KELS keeps
    the first ``ceil(rate * c)`` of the ``c`` channels still alive, and nothing pruned before
    comes back (PyTorch's ``PruningContainer`` semantics for structured methods).

    Args:
        rate (float): split rate in (0, 1], the fraction of channels *kept* (not pruned).
        keep_inputs (bool): keep every input channel (dim 1), as for a network's input layer
            whose inputs are, say, RGB. Default: False.
        keep_outputs (bool): keep every output channel (dim 0), as for a network's output layer
            whose outputs are the logits. Default: False.
        amount (float): instead of ``rate``, PyTorch's convention: the fraction *pruned*, in [0, 1).

    Raises:
        KecompressError: ``rate`` is not a number in (0, 1], or both or neither of ``rate`` and
            ``amount`` are given.
    """

    PRUNING_TYPE = "structured"

    def __init__(self, rate=None, keep_inputs: bool = False, keep_outputs: bool = False, *, amount=None) -> None:
        self.rate = kept_fraction(rate, amount)
        self.keep_inputs = keep_inputs
        self.keep_outputs = keep_outputs
        # PruningContainer hands a structured method only the channels along `dim` that are
        # not pruned yet; KELS's primary channels are the outputs.
        self.dim = 0

    def compute_mask(self, t, default_mask):
        r"""Return ``default_mask`` with every entry outside the KELS fit set to 0.

        Args:
            t (torch.Tensor): the tensor to split (only its shape is used).
            default_mask (torch.Tensor): mask of earlier pruning, same shape as ``t``.

        Returns:
            torch.Tensor: the combined mask, same shape and dtype as ``default_mask``.
        """
        fit = self._first_channels(default_mask, 0, self.keep_outputs)
        fit = fit.view(-1, *[1] * (default_mask.dim() - 1))
        if default_mask.dim() >= 2:
            inputs = self._first_channels(default_mask, 1, self.keep_inputs)
            fit = fit & inputs.view(1, -1, *[1] * (default_mask.dim() - 2))
        return default_mask * fit.to(dtype=default_mask.dtype)

    def _first_channels(self, default_mask, dim: int, keep_all: bool) -> torch.Tensor:
        """Bool vector over ``dim``: the first ``ceil(rate * alive)`` channels still alive."""
        alive = default_mask != 0
        if alive.dim() > 1:
            alive = alive.movedim(dim, 0).flatten(1).any(dim=1)
        if keep_all:
            return alive
        keep = math.ceil(self.rate * int(alive.sum()))
        return alive & (alive.cumsum(0) <= keep)

    @classmethod
    def apply(cls, module, name, rate=None, keep_inputs=False, keep_outputs=False, *, amount=None):  # type: ignore[override]
        r"""Add KELS pruning on the fly and the reparameterisation of ``module.name``.

        Args:
            module (nn.Module): module holding the tensor to split.
            name (str): name of the parameter inside ``module``, e.g. ``"weight"``.
            rate (float): split rate in (0, 1], the fraction kept.
            keep_inputs (bool): keep every input channel.
            keep_outputs (bool): keep every output channel.
            amount (float): instead of ``rate``, the fraction pruned (PyTorch's convention).

        Returns:
            KELS or PruningContainer: the hook now registered on ``module``.
        """
        rate = kept_fraction(rate, amount)
        keeps_a_whole_side = keep_inputs or keep_outputs
        if getattr(module, name).dim() == 1 and keeps_a_whole_side and _pruning_hook(module, name) is not None:
            # PruningContainer passes a structured method a 1-D tensor as a (1, C) view, where
            # the keep flags would act on the wrong dimension.
            raise KecompressError(
                f"KELS with keep_inputs/keep_outputs cannot be applied on top of earlier pruning of "
                f"the 1-D tensor '{name}': apply KELS first, or make the earlier pruning permanent "
                f"with torch.nn.utils.prune.remove(module, '{name}')")
        return super().apply(module, name, rate=rate, keep_inputs=keep_inputs, keep_outputs=keep_outputs)


class WELS(prune.BasePruningMethod):
    r"""Weight-level split: every entry is in the fit hypothesis with probability ``rate``.

    Independent Bernoulli draws from ``torch.Generator().manual_seed(seed)``: the same seed on
    a tensor of the same shape (and the same earlier pruning) gives the same mask. On a tensor
    that is already pruned, only entries still alive are drawn, and nothing pruned before comes
    back. Works with ``prune.global_unstructured`` (one draw over all the tensors together).

    The fit hypothesis is sparse, not slim: the zeros sit in dense tensors, which dense runtimes
    (PyTorch, onnxruntime) run at full cost.

    Args:
        rate (float): split rate in (0, 1], the probability that an entry is *kept*.
        seed (int): seed of the generator the mask is drawn from. Default: 0.
        amount (float): instead of ``rate``, PyTorch's convention: the fraction *pruned*, in [0, 1),
            so that ``prune.global_unstructured(params, pruning_method=WELS, amount=0.5)`` works
            as with PyTorch's own methods.

    Raises:
        KecompressError: ``rate`` is not a number in (0, 1], or both or neither of ``rate`` and
            ``amount`` are given.
    """

    PRUNING_TYPE = "unstructured"

    def __init__(self, rate=None, seed: int = 0, *, amount=None) -> None:
        self.rate = kept_fraction(rate, amount)
        self.seed = int(seed)

    def compute_mask(self, t, default_mask):
        r"""Return ``default_mask`` with every entry that the seeded draw puts in the reset set to 0.

        Args:
            t (torch.Tensor): the tensor to split (only its shape is used). Inside a
                ``PruningContainer`` this is the flat vector of entries not yet pruned.
            default_mask (torch.Tensor): mask of earlier pruning, same shape as ``t``.

        Returns:
            torch.Tensor: the combined mask, same shape and dtype as ``default_mask``.
        """
        generator = torch.Generator().manual_seed(self.seed)
        fit = torch.rand(default_mask.shape, generator=generator) < self.rate
        return default_mask * fit.to(device=default_mask.device, dtype=default_mask.dtype)

    @classmethod
    def apply(cls, module, name, rate=None, seed=0, *, amount=None):  # type: ignore[override]
        r"""Add WELS pruning on the fly and the reparameterisation of ``module.name``.

        Args:
            module (nn.Module): module holding the tensor to split.
            name (str): name of the parameter inside ``module``, e.g. ``"weight"``.
            rate (float): split rate in (0, 1], the probability an entry is kept.
            seed (int): seed of the Bernoulli draw.
            amount (float): instead of ``rate``, the fraction pruned (PyTorch's convention).

        Returns:
            WELS or PruningContainer: the hook now registered on ``module``.
        """
        return super().apply(module, name, rate=kept_fraction(rate, amount), seed=seed)


class FitMask(prune.BasePruningMethod):
    r"""Prune with a precomputed fit mask, such as one mask of a :class:`~kecompress.Split`.

    Like PyTorch's ``CustomFromMask``, its ``PRUNING_TYPE`` is ``"global"``: a mask made for the
    full tensor lines up only with the full tensor, which is what ``PruningContainer`` hands a
    global method (a structured or unstructured one would be handed a slice).

    Args:
        mask (torch.Tensor): bool (or 0/1) tensor of the parameter's shape, True = fit.
    """

    PRUNING_TYPE = "global"

    def __init__(self, mask: torch.Tensor) -> None:
        self.mask = mask

    def compute_mask(self, t, default_mask):
        r"""Return ``default_mask`` with every entry outside the fit mask set to 0.

        Args:
            t (torch.Tensor): the tensor to split (only its shape is used).
            default_mask (torch.Tensor): mask of earlier pruning, same shape as ``t``.

        Returns:
            torch.Tensor: the combined mask, same shape and dtype as ``default_mask``.
        """
        return default_mask * self.mask.to(device=default_mask.device, dtype=default_mask.dtype)

    @classmethod
    def apply(cls, module, name, mask):  # type: ignore[override]
        r"""Add fit-mask pruning on the fly and the reparameterisation of ``module.name``.

        Args:
            module (nn.Module): module holding the tensor to split.
            name (str): name of the parameter inside ``module``, e.g. ``"weight"``.
            mask (torch.Tensor): the fit mask, of the parameter's shape.

        Returns:
            FitMask or PruningContainer: the hook now registered on ``module``.
        """
        return super().apply(module, name, mask=mask)


def kels(module: nn.Module, name: str, rate: float, keep_inputs: bool = False,
         keep_outputs: bool = False) -> nn.Module:
    r"""Split the tensor ``module.name`` at kernel level (see :class:`KELS`); modifies ``module``.

    Like ``prune.random_structured``: the parameter ``name`` moves to ``name + '_orig'``, the
    mask becomes the buffer ``name + '_mask'`` and a forward pre-hook recomputes ``module.name``
    as their product before every forward pass.

    Args:
        module (nn.Module): module holding the tensor to split.
        name (str): name of the parameter inside ``module``, e.g. ``"weight"``.
        rate (float): split rate in (0, 1], the fraction of channels *kept*.
        keep_inputs (bool): keep every input channel (the network's input layer).
        keep_outputs (bool): keep every output channel (the network's output layer).

    Returns:
        nn.Module: ``module``, now pruned.

    Example:
        >>> conv = kels(nn.Conv2d(5, 6, 3), "weight", rate=0.5)
        >>> conv.weight_mask[:, :, 0, 0]
        tensor([[1., 1., 1., 0., 0.],
                [1., 1., 1., 0., 0.],
                [1., 1., 1., 0., 0.],
                [0., 0., 0., 0., 0.],
                [0., 0., 0., 0., 0.],
                [0., 0., 0., 0., 0.]])
    """
    KELS.apply(module, name, check_rate(rate), keep_inputs=keep_inputs, keep_outputs=keep_outputs)
    return module


def wels(module: nn.Module, name: str, rate: float, seed: int = 0) -> nn.Module:
    r"""Split the tensor ``module.name`` at weight level (see :class:`WELS`); modifies ``module``.

    Like ``prune.random_unstructured``, but each entry is kept with probability ``rate`` from
    a seeded generator, so the same seed gives the same mask.

    Args:
        module (nn.Module): module holding the tensor to split.
        name (str): name of the parameter inside ``module``, e.g. ``"weight"``.
        rate (float): split rate in (0, 1], the probability an entry is *kept*.
        seed (int): seed of the Bernoulli draw. Default: 0.

    Returns:
        nn.Module: ``module``, now pruned.

    Example:
        >>> a = wels(nn.Linear(100, 100), "weight", rate=0.3, seed=1)
        >>> b = wels(nn.Linear(100, 100), "weight", rate=0.3, seed=1)
        >>> torch.equal(a.weight_mask, b.weight_mask), round(a.weight_mask.mean().item(), 1)
        (True, 0.3)
    """
    WELS.apply(module, name, check_rate(rate), seed=seed)
    return module


def apply_split(model: nn.Module, split: "Split") -> nn.Module:
    r"""Prune every parameter the split covers with its fit mask; modifies ``model``.

    Afterwards ``model`` computes the fit hypothesis as a masked dense network (the reset
    hypothesis reads as zeros), its state dict holds ``<name>_orig`` and ``<name>_mask`` in
    place of ``<name>``, and ``prune.is_pruned(model)`` is True. Training goes on updating
    ``<name>_orig``. Take it off with :func:`remove_split`.

    ``copy.deepcopy`` of a model with a split applied fails in PyTorch up to at least 2.14
    (pytorch#37322: the masked weight is a non-leaf tensor); copy before applying or after
    removing.

    Args:
        model (nn.Module): the model the split was made for, without any pruning on the
            parameters the split covers.
        split (Split): a :class:`~kecompress.Split` (only ``masks`` is read).

    Returns:
        nn.Module: ``model``, now pruned.

    Raises:
        KecompressError: the split names a parameter the model does not have or of another
            shape, the split is already applied, or a parameter is already pruned otherwise.

    Example:
        >>> import kecompress
        >>> model = nn.Sequential(nn.Linear(4, 3))
        >>> split = kecompress.split(model, "wels", 0.5, seed=0)
        >>> sorted(apply_split(model, split).state_dict())
        ['0.bias', '0.weight_mask', '0.weight_orig']
    """
    targets = [(_owner(model, name), name, mask) for name, mask in split.masks.items()]
    for (module, param_name), name, mask in targets:
        hook = _pruning_hook(module, param_name)
        if _holds_fit_mask(hook):
            raise KecompressError(
                f"a split is already applied to this model (parameter '{name}'): "
                "call remove_split(model, split) before applying one again")
        if hook is not None:
            raise KecompressError(
                f"parameter '{name}' is already pruned ({type(hook).__name__}): apply_split needs "
                f"unpruned parameters; make that pruning permanent with "
                f"torch.nn.utils.prune.remove(module, '{param_name}') first")
        param = module._parameters.get(param_name)
        if param is None:
            raise KecompressError(
                f"the split was made for another model: it names parameter '{name}', which this "
                "model does not have; make a split of this model with kecompress.split")
        if param.shape != mask.shape:
            raise KecompressError(
                f"the split was made for another model: its mask for '{name}' has shape "
                f"{tuple(mask.shape)} but the parameter has shape {tuple(param.shape)}; make a "
                "split of this model with kecompress.split")
    for (module, param_name), _, mask in targets:
        position = list(module._parameters).index(param_name)
        FitMask.apply(module, param_name, mask)
        _move_parameter(module, param_name + "_orig", position)
    return model


def remove_split(model: nn.Module, split: "Split", keep_masked: bool = False) -> nn.Module:
    r"""Take off a split applied with :func:`apply_split`; modifies ``model``.

    With ``keep_masked=False`` the dense network comes back as it is: every ``<name>_orig``
    becomes ``<name>`` again (the same ``Parameter`` object, bit for bit, in its old place in
    ``model.parameters()``), and the masks and hooks are gone. With ``keep_masked=True`` it is
    ``prune.remove``: the reset hypothesis stays zero in the weights for good.

    Args:
        model (nn.Module): a model with ``split`` applied.
        split (Split): the split that was applied (only ``masks`` is read).
        keep_masked (bool): make the masked weights permanent. Default: False.

    Returns:
        nn.Module: ``model``, no longer pruned where the split was.

    Raises:
        KecompressError: the split (or this split) is not applied to ``model``, or a parameter
            was pruned again on top of the split and ``keep_masked`` is False.

    Example:
        >>> import kecompress
        >>> model = nn.Sequential(nn.Linear(4, 3))
        >>> split = kecompress.split(model, "wels", 0.5, seed=0)
        >>> before = model[0].weight.clone()
        >>> model = remove_split(apply_split(model, split), split)
        >>> torch.equal(model[0].weight, before), prune.is_pruned(model)
        (True, False)
    """
    targets = []
    for name, mask in split.masks.items():
        module, param_name = _owner(model, name)
        hook = _pruning_hook(module, param_name)
        if not _holds_fit_mask(hook):
            raise KecompressError(
                f"the split is not applied to this model (parameter '{name}' has no fit mask): "
                "call apply_split(model, split) first")
        if isinstance(hook, prune.PruningContainer):
            if not keep_masked:
                raise KecompressError(
                    f"parameter '{name}' was pruned again after the split was applied, and the "
                    "dense weights cannot be restored without undoing that pruning too: call "
                    "remove_split(model, split, keep_masked=True) to make all of it permanent")
        elif not torch.equal(hook.mask.to(mask.device).bool(), mask.bool()):
            raise KecompressError(
                f"another split is applied to parameter '{name}': pass the split that was applied")
        targets.append((module, param_name))
    for module, param_name in targets:
        position = list(module._parameters).index(param_name + "_orig")
        if keep_masked:
            prune.remove(module, param_name)
        else:
            _restore_dense(module, param_name)
        _move_parameter(module, param_name, position)
    return model


@contextmanager
def fit_hypothesis(model: nn.Module, split: "Split"):
    r"""Run a block on the fit hypothesis: apply the split, yield, restore the dense weights.

    The dense weights come back bit for bit, even when the block raises. The train/eval mode
    is left to the caller.

    Args:
        model (nn.Module): the model the split was made for.
        split (Split): the split whose fit hypothesis to run.

    Yields:
        nn.Module: ``model``, computing its fit hypothesis.

    Example:
        >>> import kecompress
        >>> model = nn.Sequential(nn.Linear(4, 3))
        >>> split = kecompress.split(model, "kels", 0.5, example_inputs=torch.randn(1, 4))
        >>> with fit_hypothesis(model, split) as fit:
        ...     fit(torch.randn(2, 4)).shape
        torch.Size([2, 3])
        >>> prune.is_pruned(model)
        False
    """
    apply_split(model, split)
    try:
        yield model
    finally:
        remove_split(model, split)


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The module that owns parameter ``name`` (as in ``named_parameters()``), and its local name."""
    module_name, _, param_name = name.rpartition(".")
    try:
        return model.get_submodule(module_name), param_name
    except AttributeError:
        raise KecompressError(
            f"the split was made for another model: it names parameter '{name}', but this model "
            f"has no layer '{module_name}'; make a split of this model with kecompress.split") from None


def _pruning_hook(module: nn.Module, param_name: str) -> prune.BasePruningMethod | None:
    """The pruning hook on ``module.param_name`` (PyTorch allows one per tensor), or None."""
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, prune.BasePruningMethod) and hook._tensor_name == param_name:
            return hook
    return None


def _holds_fit_mask(hook: prune.BasePruningMethod | None) -> bool:
    methods = list(hook) if isinstance(hook, prune.PruningContainer) else [hook]
    return any(isinstance(method, FitMask) for method in methods)


def _restore_dense(module: nn.Module, param_name: str) -> None:
    """Undo the reparameterisation without touching the values: ``name_orig`` becomes ``name``."""
    for key, hook in list(module._forward_pre_hooks.items()):
        if isinstance(hook, prune.BasePruningMethod) and hook._tensor_name == param_name:
            del module._forward_pre_hooks[key]
    original = module._parameters.pop(param_name + "_orig")
    del module._buffers[param_name + "_mask"]
    delattr(module, param_name)  # the masked copy the hook stored as a plain attribute
    module.register_parameter(param_name, original)


def _move_parameter(module: nn.Module, key: str, position: int) -> None:
    """Put parameter ``key`` at ``position`` among the module's parameters.

    The pruning API re-registers a parameter at the end; putting it back keeps the order of
    ``model.parameters()`` and of the state dict, which optimizers and checkpoints rely on.
    """
    entries = list(module._parameters.items())
    entry = next(item for item in entries if item[0] == key)
    entries.remove(entry)
    entries.insert(position, entry)
    module._parameters.clear()
    module._parameters.update(entries)
