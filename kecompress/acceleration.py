"""What makes the training step faster: mixed precision, channels-last and torch.compile.

``fp32`` computes everything in float32. ``bf16`` and ``fp16`` run the forward pass under
``torch.autocast`` (matrix products and convolutions in the half type, reductions and losses in
float32; the weights stay float32). float16 has a narrow range, so its loss is scaled up before
the backward pass by a ``torch.amp.GradScaler``, which skips a step whose gradients overflowed
and lowers the scale; bfloat16 has float32's range and needs no scaling.

Channels-last stores image batches and convolution weights as NHWC, which the convolution kernels
of recent CPUs and GPUs prefer; ``torch.compile`` fuses the forward and backward passes. Both are
checked before a run starts, so a missing compiler fails in one line rather than at the first step.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import warnings
from collections.abc import Callable
from contextlib import nullcontext

import torch
import torch.nn as nn

from .errors import KecompressError

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class MixedPrecision:
    """One precision on one device: the autocast context and, for fp16, the gradient scaler.

    Args:
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"``.
        device: where the model runs.

    Raises:
        KecompressError: an unknown precision, or one this device cannot autocast to.

    Example:
        >>> amp = MixedPrecision("bf16", "cpu")
        >>> with amp.autocast():
        ...     y = torch.nn.Linear(4, 2)(torch.randn(3, 4))
        >>> y.dtype, amp.scaler is None
        (torch.bfloat16, True)
    """

    def __init__(self, precision: str = "fp32", device: torch.device | str = "cpu"):
        if precision not in PRECISIONS:
            raise KecompressError(f"unknown precision {precision!r}: use {', '.join(PRECISIONS)}, e.g. --precision bf16")
        self.precision, self.device, self.dtype = precision, torch.device(device), PRECISIONS[precision]
        if self.dtype is not None:
            _check_autocast(self.device, self.dtype, precision)
        self.scaler = torch.amp.GradScaler(self.device.type) if precision == "fp16" else None

    def autocast(self):
        """The context to run forward passes (and the loss) in.

        Example:
            >>> with MixedPrecision("fp32").autocast():
            ...     pass
        """
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def backward_and_step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer,
                          before_step: Callable[[], None] | None = None) -> None:
        """Back-propagate ``loss`` and step ``optimizer``, through the scaler for fp16;
        ``before_step`` is called between the two (the gradients still scaled for fp16).

        Example:
            >>> layer = torch.nn.Linear(2, 1)
            >>> optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
            >>> MixedPrecision("fp32").backward_and_step(layer(torch.ones(1, 2)).sum(), optimizer)
        """
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        if before_step is not None:
            before_step()
        if self.scaler is None:
            optimizer.step()
            return
        self.scaler.step(optimizer)  # skipped when the gradients hold an inf or a NaN
        self.scaler.update()

    def state_dict(self) -> dict | None:
        """The scaler's state (its current scale) for a checkpoint; None without a scaler.

        Example:
            >>> MixedPrecision("fp16").state_dict()["scale"]
            65536.0
        """
        return self.scaler.state_dict() if self.scaler is not None else None

    def load_state_dict(self, state: dict | None) -> None:
        """Restore the scaler from :meth:`state_dict` (nothing to restore without a scaler).

        Example:
            >>> amp = MixedPrecision("fp16")
            >>> amp.load_state_dict({**amp.state_dict(), "scale": 1024.0})
            >>> amp.scaler.get_scale()
            1024.0
        """
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)

    def step_schedule(self, schedule) -> None:
        """Step the learning-rate ``schedule`` after :meth:`backward_and_step`.

        When the scaler skipped the optimizer step, the schedule still advances, so that every
        generation keeps its length; torch's warning about that order is expected then, and
        silenced.

        Example:
            >>> optimizer = torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.1)
            >>> schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=2)
            >>> MixedPrecision("fp16").step_schedule(schedule)  # no optimizer step yet: no warning
        """
        if self.scaler is None:
            schedule.step()
            return
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
            schedule.step()


def _check_autocast(device: torch.device, dtype: torch.dtype, precision: str) -> None:
    # Ask torch itself: a tiny product under autocast must come out in the asked-for type.
    fix = "use --precision fp16" if precision == "bf16" and device.type == "cuda" else "use --precision fp32"
    try:
        with torch.autocast(device.type, dtype=dtype):
            product = torch.ones(2, 2, device=device) @ torch.ones(2, 2, device=device)
    except (RuntimeError, AssertionError) as error:
        raise KecompressError(f"--precision {precision} is not available on {device} with this torch "
                              f"({str(error).splitlines()[0]}): {fix}") from None
    if product.dtype != dtype or (device.type == "cuda" and dtype == torch.bfloat16
                                  and not torch.cuda.is_bf16_supported()):
        raise KecompressError(f"--precision {precision} is not available on {device}: {fix}")


def check_compile(device: torch.device) -> None:
    """Refuse ``torch.compile`` where it cannot work, naming the fix.

    Example:
        >>> check_compile(torch.device("cpu"))  # g++ is installed here
    """
    import torch._dynamo  # not loaded by ``import torch``; only compiling needs it

    if not torch._dynamo.is_dynamo_supported():
        raise KecompressError("torch.compile does not support this Python or platform: drop --compile")
    if device.type == "cpu":
        compiler = os.environ.get("CXX", "g++")  # what torch.compile's C++ back end calls on Linux
        if shutil.which(compiler) is None:
            raise KecompressError(f"torch.compile on the CPU needs a C++ compiler and {compiler} was not found: "
                                  "install one (e.g. apt install g++) or drop --compile")
    elif device.type == "cuda" and importlib.util.find_spec("triton") is None:
        raise KecompressError("torch.compile on a GPU needs triton, which is not installed: "
                              "pip install triton, or drop --compile")


def check_channels_last(model: nn.Module) -> None:
    """Refuse the channels-last memory format for a model without 2-D convolutions (no gain).

    Example:
        >>> check_channels_last(nn.Sequential(nn.Conv2d(3, 8, 3)))
    """
    if not any(isinstance(module, nn.Conv2d) for module in model.modules()):
        raise KecompressError("--channels-last helps only convolutional networks on image batches and this "
                              "model has no 2-D convolution: drop --channels-last")
