"""One writer per run directory: an OS lock that a second writer is refused, naming the holder.

The lock is ``flock`` on a file in the directory. The kernel drops it when its holder ends, however
it ends (SIGKILL included), so a lock left by a killed run is simply taken by the next one. On a
network file system, Linux's NFS client turns ``flock`` into an NFS byte-range lock, which other
machines see (NFSv4, or v3 with lockd); a machine that dies holding it keeps it until the server's
lease runs out (90 s by default). Under torchrun only rank 0 takes it: only rank 0 writes.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from .errors import KecompressError

LOCK_FILE = ".kecompress.lock"

_held: dict[Path, int] = {}  # this process's locks: directory -> the locked file's descriptor


def acquire(directory: str | Path) -> None:
    """Hold the writer's lock on ``directory`` (created if missing) until :func:`release`, or
    the process ends; holding it already is no error. Another process's lock is refused in one line.

    Example:
        >>> import tempfile
        >>> run = tempfile.mkdtemp()
        >>> acquire(run); acquire(run); holder(run)["pid"] == os.getpid()
        True
        >>> release(run)
    """
    directory = Path(directory).resolve()
    if directory in _held:
        return
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_FILE
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            who = _describe(_read_holder(fd))
            os.close(fd)
            raise KecompressError(f"{directory} is being written by another kecompress run ({who}): wait for it "
                                  "to end, or choose another --out") from None
        if _same_file(fd, path):
            break
        os.close(fd)  # its holder removed the file as we opened it: lock the one there now
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}).encode())
    _held[directory] = fd


def release(directory: str | Path) -> None:
    """Let go of the lock on ``directory`` and remove its file; nothing when it is not held here.

    Example:
        >>> release("runs/never-locked")
    """
    directory = Path(directory).resolve()
    fd = _held.pop(directory, None)
    if fd is None:
        return
    (directory / LOCK_FILE).unlink(missing_ok=True)  # still held: whoever opened it meanwhile sees it gone
    os.close(fd)


def holder(directory: str | Path) -> dict | None:
    """Who holds the lock on ``directory`` (``pid``, ``host``, ``since``), or None when nobody does.

    Example:
        >>> holder("runs/never-locked") is None
        True
    """
    path = Path(directory) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _read_holder(fd) or {}
    finally:
        os.close(fd)
    return None


def _read_holder(fd: int) -> dict | None:
    try:
        return json.loads(os.pread(fd, 4096, 0) or b"null")
    except (ValueError, OSError):
        return None  # written this instant


def _describe(who: dict | None) -> str:
    if not who:
        return "a process that is starting"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(who.get("since", 0)))
    return f"pid {who.get('pid')} on host {who.get('host')}, since {since}"


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False
