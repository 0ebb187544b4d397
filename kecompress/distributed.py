"""Data-parallel runs under torchrun: the process group, ranks, and the collectives the loop needs.

``torchrun --nproc_per_node N -m kecompress evolve ...`` starts N processes and tells each one
its place through environment variables (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``, ``MASTER_PORT``). :func:`setup` joins the process group they describe: gloo
on the CPU, NCCL for CUDA tensors (with gloo beside it, so that errors and other Python
objects travel without a GPU). Every function here also works in a plain single process, where
the collectives do nothing, so that calling code needs no branches.

Rank 0 is the *main* rank: it alone reads and writes the run directory and prints. A user
error found on some ranks must end every rank with the same message, or the others would wait
for them in the next collective: :func:`fail_together` and :func:`run_on_main` see to it.
"""

from __future__ import annotations

import gc
import os
from contextlib import contextmanager
from typing import Callable, Sequence

import torch
import torch.distributed as dist

from .errors import KecompressError

# Marks an exception that every rank raised at the same point, so that one line is printed.
_ON_EVERY_RANK = "_kecompress_on_every_rank"


def launched() -> bool:
    """True in a process that torchrun started as one of two or more.

    Example:
        >>> launched()  # a plain ``python`` process
        False
    """
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_distributed() -> bool:
    """True once this process has joined a process group of two or more processes.

    Example:
        >>> is_distributed()
        False
    """
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank: from the process group, or from torchrun's ``RANK`` before it exists.

    Example:
        >>> rank()
        0
    """
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else int(os.environ.get("RANK", "0"))


def world_size() -> int:
    """The number of processes in the run (1 without torchrun).

    Example:
        >>> world_size()
        1
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    """True on rank 0, the process that writes files and prints.

    Example:
        >>> is_main()
        True
    """
    return rank() == 0


def setup(device: str | torch.device = "cpu") -> None:
    """Join the process group that torchrun announced; nothing to do without torchrun.

    Call it once, before anything that might fail on one rank only: it needs nothing but the
    environment, so errors found afterwards can be shared through :func:`fail_together`.
    Then take this process's device from :func:`local_device`.

    Args:
        device: the device the run asked for (``"cpu"``, ``"cuda"``, ``"auto"``...): CUDA adds
            NCCL for GPU tensors beside gloo.

    Example:
        >>> setup("cpu")  # under plain python: no process group
        >>> is_distributed()
        False
    """
    if not launched() or dist.is_initialized():
        return
    wants_cuda = str(device) == "auto" or str(device).startswith("cuda")
    backend = "cpu:gloo,cuda:nccl" if wants_cuda and torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)


def local_device(device: torch.device) -> torch.device:
    """This process's device: one GPU per process under torchrun (``cuda:LOCAL_RANK``).

    Raises:
        KecompressError: a given GPU index under torchrun, or fewer GPUs than processes here.

    Example:
        >>> local_device(torch.device("cpu"))
        device(type='cpu')
    """
    if device.type != "cuda" or not launched():
        return device
    if device.index is not None:
        raise KecompressError(f"--device {device} names one GPU, but under torchrun every process takes the GPU "
                              "of its local rank: pass --device cuda (choose GPUs with CUDA_VISIBLE_DEVICES)")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", str(local_rank + 1)))
    if processes > torch.cuda.device_count():
        raise KecompressError(f"torchrun started {processes} processes on this machine but it has "
                              f"{torch.cuda.device_count()} GPUs: pass --nproc_per_node {torch.cuda.device_count()}")
    device = torch.device("cuda", local_rank)
    torch.cuda.set_device(device)
    return device


def teardown() -> None:
    """Leave the process group (if any), e.g. at the end of a command.

    Example:
        >>> teardown()  # nothing to leave in a plain process
    """
    if dist.is_available() and dist.is_initialized():
        # A DistributedDataParallel model in a reference cycle (a loop and its callbacks) holds
        # the process group until the collector runs; freed only at interpreter exit, gloo's
        # threads are then destroyed unjoined and the process aborts.
        gc.collect()
        dist.destroy_process_group()


def barrier() -> None:
    """Wait until every rank gets here (a no-op in a single process).

    Example:
        >>> barrier()
    """
    if is_distributed():
        dist.barrier()


def raised_on_every_rank(error: BaseException) -> bool:
    """True for an exception that every rank raised alike (so only rank 0 needs to print it).

    Example:
        >>> raised_on_every_rank(KecompressError("a problem"))
        False
    """
    return getattr(error, _ON_EVERY_RANK, False)


def on_every_rank(error: BaseException) -> BaseException:
    """Mark ``error`` as raised alike by every rank (e.g. decided from the command line alone).

    Example:
        >>> raised_on_every_rank(on_every_rank(KecompressError("a problem")))
        True
    """
    setattr(error, _ON_EVERY_RANK, True)
    return error


@contextmanager
def fail_together(*exception_types: type[BaseException]):
    """Run a block on every rank; if it raised one of ``exception_types`` on any rank, every
    rank raises the first such error (by rank), marked with :func:`on_every_rank`.

    Without it, a rank that found a problem (rank 0 finding ``--out`` already used, say) would
    exit while the others wait for it in their next collective. Every rank must enter the block.

    Example:
        >>> with fail_together(KecompressError):
        ...     pass  # set-up that may fail on some ranks only
    """
    types = exception_types or (KecompressError,)
    caught = None
    try:
        yield
    except types as error:
        if not is_distributed():
            raise
        caught = error
    if not is_distributed():
        return
    errors = [None] * world_size()
    dist.all_gather_object(errors, caught)
    first = next((error for error in errors if error is not None), None)
    if first is not None:
        raise on_every_rank(first) from None


def run_on_main(function: Callable, *args, **kwargs):
    """Call ``function`` on rank 0 only and return its result on every rank.

    For what only rank 0 may do or see, such as reading or writing the run directory, which
    other machines may not share. An exception it raises (a :class:`KecompressError` or an
    ``OSError``) is raised on every rank. The result travels pickled: keep it to plain data.

    Example:
        >>> run_on_main(lambda: 6 * 7)
        42
    """
    if not is_distributed():
        return function(*args, **kwargs)
    outcome = [None, None]  # [result, error]
    if is_main():
        try:
            outcome[0] = function(*args, **kwargs)
        except (KecompressError, OSError) as error:
            outcome[1] = error
    dist.broadcast_object_list(outcome, src=0)
    if outcome[1] is not None:
        raise on_every_rank(outcome[1]) from None
    return outcome[0]


def all_sum(values: Sequence, device: torch.device | str = "cpu") -> list[float]:
    """Sums of ``values`` (numbers or one-element tensors) over every rank, as float64.

    One collective for all of them; in a single process, the values themselves.

    Example:
        >>> all_sum([1.5, torch.tensor(2.0), 3])
        [1.5, 2.0, 3.0]
    """
    device = torch.device(device)
    summed = torch.stack([torch.as_tensor(value, dtype=torch.float64).to(device).reshape(()) for value in values])
    if is_distributed():
        dist.all_reduce(summed)
    return summed.tolist()


def all_gather(value) -> list:
    """``value`` from every rank, in rank order (any picklable object).

    Example:
        >>> all_gather("mine")
        ['mine']
    """
    if not is_distributed():
        return [value]
    gathered = [None] * world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def broadcast_from_main(tensors: Sequence[torch.Tensor]) -> None:
    """Overwrite ``tensors`` in place with rank 0's values.

    Example:
        >>> broadcast_from_main([torch.zeros(2)])  # a no-op in a single process
    """
    if is_distributed():
        for tensor in tensors:
            dist.broadcast(tensor, src=0)



def average_over_ranks(tensors: Sequence[torch.Tensor]) -> None:
    """Overwrite floating-point ``tensors`` in place with their mean over every rank.

    Example:
        >>> average_over_ranks([torch.ones(2)])  # a no-op in a single process
    """
    if not is_distributed() or not tensors:
        return
    # One collective per dtype, not per tensor; in the tensors' order, the same on every rank.
    for dtype in dict.fromkeys(tensor.dtype for tensor in tensors):
        group = [tensor for tensor in tensors if tensor.dtype == dtype]
        flat = torch.cat([tensor.reshape(-1) for tensor in group])
        dist.all_reduce(flat)
        flat.div_(world_size())
        for tensor, mean in zip(group, flat.split([tensor.numel() for tensor in group])):
            tensor.copy_(mean.view_as(tensor))
