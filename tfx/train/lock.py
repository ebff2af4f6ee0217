"""One training run per workdir: `<workdir>/LOCK`, held by process 0 of the run.

Two runs on one workdir would resume from each other's checkpoints and delete each other's
unfinished saves. The lock file records the holder (host, pid, the process's start time) and a
heartbeat its owner rewrites every `HEARTBEAT_S` seconds. A lock is stale, and taken over with a
warning, when its process is gone: on the same host, no live process has that pid and start
time; from another host, its heartbeat is older than `config.lock_timeout_s` seconds (the other
host cannot be asked, so a run that hangs without heartbeats for that long loses its lock).
"""
from __future__ import annotations

import datetime
import json
import os
import socket
import threading
import time

from absl import logging

from tfx.core import files

LOCK_FILE = "LOCK"
HEARTBEAT_S = 30.0


class WorkdirLockedError(RuntimeError):
    """Another live run holds the workdir."""


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
    started = datetime.datetime.fromtimestamp(holder["started"]).isoformat(timespec="seconds")
    return f"host {holder['host']}, pid {holder['pid']}, started {started}"


class WorkdirLock:
    """`with WorkdirLock(workdir, timeout_s):` holds the lock for the block, or raises
    WorkdirLockedError naming the holder."""

    def __init__(self, workdir: str, timeout_s: float):
        self.path = os.path.join(workdir, LOCK_FILE)
        self.timeout_s = timeout_s
        self.holder = dict(host=socket.gethostname(), pid=os.getpid(),
                           process_start=_process_start(os.getpid()), started=time.time())
        self._stop = threading.Event()
        self._heartbeat = threading.Thread(target=self._beat, daemon=True, name="tfx-lock-heartbeat")

    def stale_reason(self, holder: dict) -> str | None:
        """Why the lock of `holder` is stale, or None when its run may still be alive."""
        if holder.get("host") == self.holder["host"]:
            start = _process_start(holder["pid"])
            if start is None or (start and holder.get("process_start") and start != holder["process_start"]):
                return f"process {holder['pid']} is gone"
            return None
        age = time.time() - holder.get("heartbeat", 0.0)
        if age > self.timeout_s:
            return f"its last heartbeat is {age:.0f} s old (config.lock_timeout_s={self.timeout_s:g})"
        return None

    def acquire(self):
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._read()
                if holder is None:
                    continue  # released meanwhile.
                reason = self.stale_reason(holder)
                if reason is None:
                    raise WorkdirLockedError(
                        f"{os.path.dirname(self.path)} is in use by another run ({_describe(holder)}); "
                        f"wait for it to end, or use another workdir. If that run is gone, remove {self.path}.")
                logging.warning("taking over the lock of %s: %s.", _describe(holder), reason)
                print(f"taking over the stale lock {self.path} of {_describe(holder)}: {reason}")
                os.remove(self.path)
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump({**self.holder, "heartbeat": time.time()}, f)
            self._heartbeat.start()
            return
        raise WorkdirLockedError(f"could not take {self.path}: other runs keep taking it.")

    def release(self):
        self._stop.set()
        if self._heartbeat.is_alive():
            self._heartbeat.join()
        holder = self._read()
        if holder and holder.get("pid") == self.holder["pid"] and holder.get("host") == self.holder["host"]:
            os.remove(self.path)

    def _read(self) -> dict | None:
        try:
            with open(self.path, encoding="utf-8") as f:
                return json.load(f)
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, OSError):  # unreadable: as fresh as its file, if it remains.
            try:
                heartbeat = os.path.getmtime(self.path)
            except FileNotFoundError:
                return None
            return {"host": "?", "pid": -1, "started": 0.0, "heartbeat": heartbeat}

    def _beat(self):
        while not self._stop.wait(HEARTBEAT_S):
            files.write_text(self.path, json.dumps({**self.holder, "heartbeat": time.time()}))

    def __enter__(self) -> WorkdirLock:
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()
