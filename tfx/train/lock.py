"""One training run per workdir: `<workdir>/LOCK`, held by process 0 of the run.

Two runs on one workdir would resume from each other's checkpoints and delete each other's
unfinished saves. The lock records its holder (host, boot id, pid, the process's start time, a
random token per acquisition) and a heartbeat its owner rewrites every `HEARTBEAT_S` seconds.

A lock is stale, and taken over with a warning, when its holder is gone:
- on the same machine (the same kernel boot id and pid namespace, so the same process table;
  hostnames are not compared, containers reuse them): no live process has its pid and start time;
- elsewhere: its heartbeat is older than `config.lock_timeout_s` seconds (the other machine
  cannot be asked, so a run that hangs without heartbeats that long loses its lock).

Taking it, on either storage, never lets two racers both win:
- Local disk: the lock is created with O_EXCL. A stale one is renamed aside to a unique name;
  when the file moved is not the one judged stale (another racer replaced it meanwhile), it is
  put back (a hard link, which fails rather than overwrite a newer lock) and this racer retries.
- Cloud Storage (`gs://` workdirs): the object is created with `if_generation_match=0` and
  taken over with the generation read; a 412 (PreconditionFailed) means another racer won.

The heartbeat checks ownership before each write and, when the lock is no longer its own,
records that; `check()` raises LockLostError then, or when the heartbeat has failed for half of
`lock_timeout_s` (after which another run could judge the lock stale). On Cloud Storage the
heartbeat's write carries the owner's generation as its precondition, so it never overwrites
another holder. On local disk a holder that takes over between the heartbeat's read and its
rename is overwritten: that holder's own heartbeat then finds the lock not its own and stops,
so one run stays. Only a run whose heartbeats were late by `lock_timeout_s` can meet that.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import secrets
import socket
import threading
import time

from absl import logging

from tfx.core import files

LOCK_FILE = "LOCK"
HEARTBEAT_S = 30.0
_ATTEMPTS = 5  # creates and take-overs before giving up on a contended lock.


class WorkdirLockedError(RuntimeError):
    """Another live run holds the workdir."""


class LockLostError(RuntimeError):
    """The lock this run held was taken by another run, or its heartbeat failed."""


def _machine() -> dict[str, str]:
    """The boot id of this machine's kernel and this process's pid namespace: processes with
    both equal see the same process table. Without /proc, the hostname stands in."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="utf-8") as f:
            boot_id = f.read().strip()
    except OSError:
        boot_id = f"host {socket.gethostname()}"
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        namespace = ""
    return dict(boot_id=boot_id, pid_namespace=namespace)


def _process_start(pid: int) -> str | None:
    """The start time of process `pid` in clock ticks since boot (Linux), None if there is no
    such process; "" where /proc cannot tell (the pid alone then decides)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            return f.read().rpartition(")")[2].split()[19]
    except FileNotFoundError:
        return None
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return ""


def _describe(holder: dict) -> str:
    started = datetime.datetime.fromtimestamp(holder.get("started", 0.0)).isoformat(timespec="seconds")
    return f"host {holder.get('host', '?')}, pid {holder.get('pid', -1)}, started {started}"


def _one_line(error: BaseException) -> str:
    return " ".join(f"{type(error).__name__}: {error}".split())


class _LocalFile:
    """The lock as a file. A version is the file's text: what its holder last wrote."""

    def __init__(self, path: str):
        self.path = path

    def read(self) -> tuple[str | None, str | None, float]:
        """(text, version, modification time), (None, None, 0) when there is no lock."""
        try:
            with open(self.path, encoding="utf-8") as f:
                text = f.read()
            return text, text, os.path.getmtime(self.path)
        except FileNotFoundError:
            return None, None, 0.0

    def create(self, text: str) -> str | None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        try:
            handle = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return None
        with os.fdopen(handle, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        return text

    def replace(self, seen: str, text: str) -> str | None:
        """Takes over the lock whose text was `seen`; None when another racer got there first."""
        aside = f"{self.path}.stale.{secrets.token_hex(6)}"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return None
        try:
            with open(aside, encoding="utf-8") as f:
                moved = f.read()
            if moved == seen:
                return self.create(text)
            try:  # a newer holder's lock: back where it was, unless LOCK exists again.
                os.link(aside, self.path)
            except FileExistsError:
                pass
            except OSError:  # no hard links on this filesystem.
                os.rename(aside, self.path)
            return None
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(aside)

    def rewrite(self, version: str, text: str) -> str | None:
        """Writes `text` if the lock is still `version` (None if not). A racer that moved the lock
        aside by mistake puts it back within moments, so a missing file is read again."""
        for wait_s in (0.05, 0.2, 0.0):
            current = self.read()[0]
            if current is not None:
                break
            time.sleep(wait_s)
        if current != version:
            return None
        files.write_text(self.path, text)
        return text

    def delete(self, version: str):
        if self.read()[0] == version:
            os.remove(self.path)


class _GcsObject:
    """The lock as a Cloud Storage object. A version is the object's generation."""

    def __init__(self, url: str):
        try:
            from google.api_core import exceptions
            from google.cloud import storage
        except ImportError as error:
            raise files.MissingBackendError(
                f"{url}: a lock on Cloud Storage needs google-cloud-storage; install it with "
                "pip install 'tfx-mt[gcs]'") from error
        self.url, self.exceptions = url, exceptions
        bucket, _, self.name = url.removeprefix("gs://").partition("/")
        self.bucket = storage.Client().bucket(bucket)

    def read(self) -> tuple[str | None, int | None, float]:
        for _ in range(_ATTEMPTS):
            blob = self.bucket.get_blob(self.name)
            if blob is None:
                return None, None, 0.0
            generation, modified = blob.generation, blob.updated.timestamp()  # a download resets them.
            try:
                return blob.download_as_text(if_generation_match=generation), generation, modified
            except (self.exceptions.NotFound, self.exceptions.PreconditionFailed):
                continue  # replaced between the two requests.
        raise RuntimeError(f"{self.url} kept changing while it was read.")

    def create(self, text: str) -> int | None:
        return self.rewrite(0, text)

    def replace(self, seen: int, text: str) -> int | None:
        return self.rewrite(seen, text)

    def rewrite(self, version: int, text: str) -> int | None:
        blob = self.bucket.blob(self.name)
        try:
            blob.upload_from_string(text, content_type="application/json", if_generation_match=version)
        except self.exceptions.PreconditionFailed:
            return None
        return blob.generation

    def delete(self, version: int):
        with contextlib.suppress(self.exceptions.PreconditionFailed, self.exceptions.NotFound):
            self.bucket.blob(self.name).delete(if_generation_match=version)


class WorkdirLock:
    """`with WorkdirLock(workdir, timeout_s):` holds the lock for the block, or raises
    WorkdirLockedError naming the holder. While it is held, `check()` raises LockLostError
    once it is lost."""

    def __init__(self, workdir: str, timeout_s: float):
        self.path = files.join(workdir, LOCK_FILE)
        self.timeout_s = timeout_s
        self.token = secrets.token_hex(8)
        self.holder = dict(host=socket.gethostname(), **_machine(), pid=os.getpid(),
                           process_start=_process_start(os.getpid()), started=time.time(),
                           token=self.token)
        self._backend = _LocalFile(self.path) if files.is_local(self.path) else _GcsObject(self.path)
        self._version = None  # of the lock as this holder last wrote it.
        self._lost: str | None = None  # why the lock is no longer this run's.
        self._stop = threading.Event()
        self._heartbeat = threading.Thread(target=self._beat, daemon=True, name="tfx-lock-heartbeat")

    def stale_reason(self, holder: dict) -> str | None:
        """Why the lock of `holder` is stale, or None when its run may still be alive."""
        if all(holder.get(key) == self.holder[key] for key in ("boot_id", "pid_namespace")):
            start = _process_start(holder.get("pid", -1))
            if start is None or (start and holder.get("process_start") and start != holder["process_start"]):
                return f"process {holder.get('pid', -1)} is gone"
            return None
        age = time.time() - holder.get("heartbeat", 0.0)
        if age > self.timeout_s:
            return f"its last heartbeat is {age:.0f} s old (config.lock_timeout_s={self.timeout_s:g})"
        return None

    def acquire(self):
        for _ in range(_ATTEMPTS):
            self._version = self._backend.create(self._record())
            if self._version is not None:
                break
            holder, version = self._current()
            if holder is None:
                continue  # released meanwhile.
            if holder.get("token") == self.token:  # a retried request of ours had succeeded.
                self._version = version
                break
            reason = self.stale_reason(holder)
            if reason is None:
                raise WorkdirLockedError(
                    f"{os.path.dirname(self.path)} is in use by another run ({_describe(holder)}); "
                    f"wait for it to end, or use another workdir. If that run is gone, remove {self.path}.")
            self._version = self._backend.replace(version, self._record())
            if self._version is not None:
                logging.warning("took over the lock of %s: %s.", _describe(holder), reason)
                print(f"took over the stale lock {self.path} of {_describe(holder)}: {reason}")
                break
        else:
            raise WorkdirLockedError(f"could not take {self.path}: other runs keep taking it.")
        self._heartbeat.start()

    def check(self, verify: bool = False):
        """Raises LockLostError (one line: what happened and what to do) once the lock is no
        longer this run's or its heartbeat stopped. Cheap: a flag the heartbeat sets. With
        `verify`, reads the lock first (a file read or one Cloud Storage request), so a theft
        since the last heartbeat is seen too."""
        if verify and self._lost is None:
            try:
                holder, _ = self._current()
            except Exception as error:  # the heartbeat decides whether storage errors last.
                logging.warning("could not read %s to verify it: %s", self.path, _one_line(error))
            else:
                if holder is None or holder.get("token") != self.token:
                    self._lost = self._stolen(holder)
        if self._lost is None and not self._heartbeat.is_alive() and not self._stop.is_set():
            self._lost = (f"the heartbeat of the lock {self.path} stopped without a reason; "
                          "resume with the same command.")
        if self._lost is not None:
            raise LockLostError(self._lost)

    def release(self):
        self._stop.set()
        if self._heartbeat.is_alive():
            self._heartbeat.join()
        if self._version is None:
            return
        try:  # only if it is still the lock this run last wrote.
            self._backend.delete(self._version)
        except Exception as error:  # the run's own error, if any, is the one to see.
            logging.warning("could not remove %s: %s", self.path, _one_line(error))
        self._version = None

    def _record(self) -> str:
        return json.dumps({**self.holder, "heartbeat": time.time()})

    def _current(self) -> tuple[dict | None, object]:
        """The holder the lock names now and its version; (None, None) when there is none."""
        text, version, modified = self._backend.read()
        if text is None:
            return None, None
        with contextlib.suppress(json.JSONDecodeError):
            record = json.loads(text)
            if isinstance(record, dict):
                return record, version
        # Being written, or broken: as fresh as its last write.
        return {"host": "?", "pid": -1, "started": 0.0, "heartbeat": modified}, version

    def _stolen(self, holder: dict | None) -> str:
        who = "it was removed" if holder is None else f"{_describe(holder)} holds it now"
        return (f"lost the lock {self.path}: {who}. Two runs must not share a workdir: stop the "
                "other run, or give one of them another workdir, then resume.")

    def _beat(self):
        """Rewrites the heartbeat while the lock is this run's; records why it stops."""
        last_beat = time.monotonic()
        try:
            while not self._stop.wait(HEARTBEAT_S):
                try:
                    lost = self._beat_once()
                except Exception as error:
                    silent_s = time.monotonic() - last_beat
                    if silent_s < self.timeout_s / 2:
                        logging.warning("the heartbeat of %s failed, retrying: %s", self.path,
                                        _one_line(error))
                        continue
                    lost = (f"the heartbeat of the lock {self.path} has failed for {silent_s:.0f} s "
                            f"({_one_line(error)}), so another run could take the lock over; "
                            "make the workdir writable again, then resume.")
                if lost:
                    self._lost = lost
                    return
                last_beat = time.monotonic()
        except BaseException as error:
            self._lost = (f"the heartbeat of the lock {self.path} died: {_one_line(error)}; "
                          "resume with the same command.")
            raise

    def _beat_once(self) -> str | None:
        """Writes a heartbeat if the lock is still as this run last wrote it; else, unless a
        retried write of its own went through, says who holds it now."""
        version = self._backend.rewrite(self._version, self._record())
        if version is None:
            holder, version = self._current()
            if holder is None or holder.get("token") != self.token:
                return self._stolen(holder)
        self._version = version
        return None

    def __enter__(self) -> WorkdirLock:
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()
