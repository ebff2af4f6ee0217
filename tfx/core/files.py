"""Run files on local disk or Cloud Storage (`gs://`), through etils epath, and atomic writes.

A path is any `str` or path-like; `path(p)` gives its `epath.Path`, which orbax and TFDS use
too. On Cloud Storage it goes through gcsfs (the `gcs` extra), without its listing cache, so a
listing always shows what other processes wrote.

A write is atomic wherever the process dies: the file is either its old self or complete.
- Local disk: `replacing` writes a temporary file beside the target (`<name>.<random>.tmp`,
  same directory, so the same filesystem), flushes and fsyncs it, renames it over the target
  with `os.replace`, and fsyncs the directory so the rename itself survives a crash.
- Cloud Storage: the bytes are gathered in memory and uploaded as one object, which Cloud
  Storage makes visible only once complete.
On an exception the target is untouched.
"""
from __future__ import annotations

import contextlib
import io
import os
import secrets
import shutil
from collections.abc import Iterable, Iterator
from typing import IO

import fsspec
from etils import epath

# Listings cached by gcsfs never expire, so one process would not see another's checkpoints.
fsspec.config.conf.setdefault("gcs", {})["use_listings_cache"] = False
fsspec.config.conf["gs"] = fsspec.config.conf["gcs"]

PathLike = str | os.PathLike


class MissingBackendError(ImportError):
    """A gs:// path without the gcs extra installed."""


def is_local(p: PathLike) -> bool:
    """Whether `p` is a path on this machine's filesystem (not gs:// or another URL)."""
    return "://" not in os.fspath(p)


def path(p: PathLike) -> epath.Path:
    """`p` as an epath.Path: absolute if local; a gs:// path needs gcsfs (the gcs extra)."""
    text = os.fspath(p)
    if is_local(text):
        return epath.Path(os.path.abspath(os.path.expanduser(text)))
    if text.startswith("gs://"):
        try:
            import gcsfs  # noqa: F401
        except ImportError as error:
            raise MissingBackendError(
                f"{text}: gs:// paths need gcsfs and google-cloud-storage; install them with "
                "pip install 'tfx-mt[gcs]'") from error
    return epath.Path(text)


def join(p: PathLike, *parts: str) -> str:
    """`p` / parts as a string (local paths absolute)."""
    return os.fspath(path(p).joinpath(*parts))


def _fsync_directory(directory: str):
    handle = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


@contextlib.contextmanager
def replacing(target: PathLike, mode: str = "w") -> Iterator[IO]:
    """A file object (`mode` "w" for UTF-8 text or "wb") whose contents replace `target` when
    the block exits normally; `target` stays as it was if the block raises. A new local file
    gets the permissions a plain `open` would (0666 less the umask)."""
    if mode not in ("w", "wb"):
        raise ValueError(f"mode={mode!r}: use 'w' or 'wb'.")
    if not is_local(target):
        buffer = io.BytesIO()
        text = None if "b" in mode else io.TextIOWrapper(buffer, encoding="utf-8", newline="")
        yield text or buffer
        if text:
            text.flush()
        path(target).write_bytes(buffer.getvalue())
        return
    target = os.path.abspath(os.fspath(target))
    directory = os.path.dirname(target)
    temporary = os.path.join(directory, f"{os.path.basename(target)}.{secrets.token_hex(4)}.tmp")
    handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with open(handle, mode, encoding=None if "b" in mode else "utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)
        raise
    _fsync_directory(directory)


def write_text(target: PathLike, text: str | Iterable[str]):
    """Writes `text` (a string, or pieces of one written in turn) to `target` atomically."""
    with replacing(target) as f:
        f.writelines([text] if isinstance(text, str) else text)


def write_bytes(target: PathLike, data: bytes):
    """Writes `data` to `target` atomically."""
    with replacing(target, "wb") as f:
        f.write(data)


def copy_file(source: PathLike, target: PathLike):
    """Copies the file `source` to `target` atomically (with its permission bits when both
    are local)."""
    with replacing(target, "wb") as f, path(source).open("rb") as original:
        shutil.copyfileobj(original, f)
    if is_local(source) and is_local(target):
        shutil.copymode(source, target)


def copy_tree(source: PathLike, target: PathLike):
    """Copies the directory `source` into `target` (created), file by file; either may be
    local or on Cloud Storage. Used to bring a local tool's output to a remote run."""
    source, target = path(source), path(target)
    target.mkdir(parents=True, exist_ok=True)
    for child in source.iterdir():
        if child.is_dir():
            copy_tree(child, target / child.name)
        else:
            copy_file(child, target / child.name)


def move_tree(source: PathLike, target: PathLike):
    """Moves the directory `source` to `target`: one rename on local disk; on Cloud Storage,
    which has no directories, a copy of every object and then the removal of the originals."""
    if is_local(source) and is_local(target):
        os.rename(os.fspath(path(source)), os.fspath(path(target)))
        return
    copy_tree(source, target)
    path(source).rmtree()
