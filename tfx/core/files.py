"""Atomic file writes: a file is either its old self or complete, whenever the process dies.

Every writer goes through `replacing`: the bytes go to a temporary file beside the target (same
directory, so the same filesystem), which is flushed and fsynced, renamed over the target with
`os.replace`, and the directory is fsynced so the rename itself survives a crash. On an
exception the temporary is removed and the target is untouched. Temporaries are named
`<name>.<random>.tmp`, so a tool can sweep `*.tmp` left by a killed process.
"""
from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Iterable, Iterator
from typing import IO


def _fsync_directory(directory: str):
    handle = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


@contextlib.contextmanager
def replacing(path: str, mode: str = "w") -> Iterator[IO]:
    """A file object (`mode` "w" for UTF-8 text or "wb") whose contents replace `path` when the
    block exits normally; `path` stays as it was if the block raises. The new file gets the
    permissions a plain `open` would (0666 less the umask)."""
    if mode not in ("w", "wb"):
        raise ValueError(f"mode={mode!r}: use 'w' or 'wb'.")
    directory = os.path.dirname(os.path.abspath(path))
    temporary = os.path.join(directory, f"{os.path.basename(path)}.{secrets.token_hex(4)}.tmp")
    handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with open(handle, mode, encoding=None if "b" in mode else "utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)
        raise
    _fsync_directory(directory)


def write_text(path: str, text: str | Iterable[str]):
    """Writes `text` (a string, or pieces of one written in turn) to `path` atomically."""
    with replacing(path) as f:
        f.writelines([text] if isinstance(text, str) else text)


def write_bytes(path: str, data: bytes):
    """Writes `data` to `path` atomically."""
    with replacing(path, "wb") as f:
        f.write(data)


def copy_file(source: str, path: str):
    """Copies the file `source` (contents and permission bits) to `path` atomically."""
    with replacing(path, "wb") as f, open(source, "rb") as original:
        shutil.copyfileobj(original, f)
    shutil.copymode(source, path)
