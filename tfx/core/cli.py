"""What the command-line tools share."""
from __future__ import annotations

import runpy
import sys


def moved(name: str, old: str, new: str):
    """Runs module `new` as `python -m` would when the module `name` (a stand-in left at the old
    path `old`) is run as the main program, saying where the command went; does nothing on import."""
    if name == "__main__":
        print(f"python -m {old} is now python -m {new}", file=sys.stderr)
        runpy.run_module(new, run_name="__main__", alter_sys=True)
