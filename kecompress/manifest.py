"""The run directory's manifest: the SHA-256 of every file it wrote, to tell that file from a damaged one.

``manifest.json`` is rewritten atomically around every write, in two steps, as Orbax and
``torch.distributed.checkpoint`` commit a checkpoint and then its metadata: before a new file is
renamed into place its digest is recorded beside the one it replaces (either is then whole), and
after the rename the old digest is dropped. A kill at any moment thus leaves every file matching
the manifest. The manifest carries the digest of its own entries, so its own damage is seen too.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .errors import KecompressError

MANIFEST = "manifest.json"
FORMAT = "kecompress-manifest/1"


class DamagedFile(KecompressError):
    """A file whose bytes are not those the run directory wrote (its SHA-256 differs from the manifest's).

    Example:
        >>> str(DamagedFile(Path("runs/a/split.pt"), "restore it from a backup"))
        'runs/a/split.pt is damaged: its SHA-256 differs from the one manifest.json recorded when it was written; restore it from a backup'
    """

    def __init__(self, path: Path, fix: str):
        self.path = path
        super().__init__(f"{path} is damaged: its SHA-256 differs from the one {MANIFEST} recorded when it was "
                         f"written; {fix}")


def digest(data: bytes) -> str:
    """The SHA-256 of ``data``, in hex.

    Example:
        >>> digest(b"")[:16]
        'e3b0c44298fc1c14'
    """
    return hashlib.sha256(data).hexdigest()


def entry(data: bytes, replaces: dict | None = None) -> dict:
    """The manifest's record of a file holding ``data``; with ``replaces``, the record of the file
    it replaces, whose digest still counts until the new file is renamed into place.

    Example:
        >>> entry(b"a", replaces=entry(b"b"))["bytes"]
        1
    """
    record = {"sha256": digest(data), "bytes": len(data)}
    if replaces is not None:
        record["replaces"] = replaces["sha256"]
    return record


def matches(record: dict, data: bytes) -> bool:
    """Whether ``data`` is the file ``record`` describes (or the one it replaces, mid-write).

    Example:
        >>> matches(entry(b"new", replaces=entry(b"old")), b"old"), matches(entry(b"new"), b"neu")
        (True, False)
    """
    return digest(data) in (record.get("sha256"), record.get("replaces"))


def encode(files: dict[str, dict]) -> bytes:
    """The manifest of ``files`` (name -> :func:`entry`), as written.

    Example:
        >>> decode(encode({"a.pt": entry(b"a")}))["a.pt"]["bytes"]
        1
    """
    return (json.dumps({"format": FORMAT, "files": files, "sha256": _digest_of(files)}, indent=2) + "\n").encode()


def decode(data: bytes) -> dict[str, dict]:
    """The entries of a manifest; :class:`ValueError` when it is damaged.

    Example:
        >>> decode(encode({}))
        {}
    """
    content = json.loads(data)
    if not isinstance(content, dict) or content.get("format") != FORMAT or not isinstance(content.get("files"), dict) \
            or content.get("sha256") != _digest_of(content["files"]):
        raise ValueError("not an intact manifest")
    return content["files"]


def _digest_of(files: dict) -> str:
    return digest(json.dumps(files, sort_keys=True).encode())


def read(directory: Path) -> dict[str, dict] | None:
    """The entries of ``directory``'s manifest; None when it has none; :class:`ValueError` when damaged.

    Example:
        >>> read(Path("runs/never-written")) is None
        True
    """
    try:
        data = (directory / MANIFEST).read_bytes()
    except FileNotFoundError:
        return None
    try:
        return decode(data)
    except (ValueError, UnicodeDecodeError):
        raise ValueError(f"{directory / MANIFEST} is damaged") from None
