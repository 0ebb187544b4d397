"""Atomic file writes: a crash at any moment leaves either the old file or the new one."""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside ``path``; on success it is fsynced and renamed onto ``path``.

    If the body raises, the temporary file is removed and ``path`` is left as it was.

    Example:
        >>> import tempfile, os
        >>> target = os.path.join(tempfile.mkdtemp(), "out.txt")
        >>> with atomic_path(target) as tmp:
        ...     _ = open(tmp, "w").write("done")
        >>> open(target).read()
        'done'
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
    try:
        yield Path(tmp)
        with open(tmp, "rb") as written:
            os.fsync(written.fileno())
        os.replace(tmp, path)
        _fsync_directory(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def staged_directory(directory: str | Path):
    """Yield a new hidden directory inside ``directory`` (created if missing); on success every
    file written there is moved into ``directory``, replacing files of the same name. If the
    body raises, nothing is moved. Either way the staging directory is removed.

    For a set of files that must appear together or not at all: each is written, and checked,
    before any is put in place.

    Example:
        >>> import tempfile, os
        >>> target = tempfile.mkdtemp()
        >>> with staged_directory(target) as staging:
        ...     _ = (staging / "a.txt").write_text("a")
        ...     os.listdir(target) != ["a.txt"]
        True
        >>> os.listdir(target)
        ['a.txt']
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=directory))
    try:
        yield staging
        for written in sorted(staging.iterdir()):
            os.replace(written, directory / written.name)
        _fsync_directory(directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def remove_stale_temporaries(directory: str | Path) -> list[Path]:
    """Delete the temporary files that writes killed half-way left in ``directory``.

    Example:
        >>> import tempfile
        >>> remove_stale_temporaries(tempfile.mkdtemp())
        []
    """
    stale = sorted(Path(directory).glob(".*.tmp"))
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_directory(directory: Path) -> None:
    # The rename itself is durable only once the directory entry is on disk.
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_torch(obj, path: str | Path) -> None:
    """``torch.save`` to ``path`` atomically.

    Example:
        >>> import tempfile, os
        >>> save_torch({"x": torch.ones(2)}, os.path.join(tempfile.mkdtemp(), "x.pt"))
    """
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def torch_bytes(obj) -> bytes:
    """What ``torch.save(obj)`` writes, in memory: its size and digest are known before it goes to disk.

    Example:
        >>> torch_bytes({"x": torch.ones(2)})[:2]
        b'PK'
    """
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def save_json(obj, path: str | Path) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically.

    Example:
        >>> import tempfile, os
        >>> save_json({"a": 1}, os.path.join(tempfile.mkdtemp(), "a.json"))
    """
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")
