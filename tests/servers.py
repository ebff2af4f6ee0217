"""serve.py started on loopback by the server tests, and stopped by them."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading

from runs import ROOT

SERVE_PY = os.path.join(ROOT, "serve.py")


class Server:
    """A serve.py process: its URL once it listens, and its stderr so far."""

    def __init__(self, args: list[str], env: dict | None = None, start_timeout: float = 600):
        self.process = subprocess.Popen(
            [sys.executable, SERVE_PY, "--port=0", *args], stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, env={**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})})
        self.lines: list[str] = []
        self.url: str | None = None
        self._listening = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        if not self._listening.wait(start_timeout) or self.url is None:
            self.process.kill()
            raise RuntimeError("serve.py did not start:\n" + "\n".join(self.lines[-30:]))

    def _read(self):
        for raw in self.process.stderr:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self.lines.append(line)
            found = re.fullmatch(r"serving on (http://\S+)", line)
            if found:
                self.url = found.group(1)
                self._listening.set()
        self._listening.set()  # it exited.

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 120) -> int:
        """Sends `sig`, waits for the exit; the return code."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc):
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
