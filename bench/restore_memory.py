"""Peak host memory of a resume's restore of the train state: prints one JSON line.

    python bench/restore_memory.py [--config configs/wmt_base.py:base] [--runs 3]

A checkpoint of the config's initial train state (parameters and optimizer moments) is saved
in a temporary directory. Then each run is a fresh process that restores it with
`Checkpoints.resume`, as train.py resumes (after host_memory.keep_freed_memory_on_cpu, as
train.py starts), into one of:
- `abstract`: ShapeDtypeStructs with the state's shardings, nothing allocated beforehand (what
  the trainer restores into);
- `random`: the random initial state, made first and alive during the restore (what the trainer
  restored into before it restored into the abstract state).
`peak_rss_mib` is the process's maximum resident set size (ru_maxrss) once the state is
restored, `start_rss_mib` the same before any state was made or read, and `restore_s` the
time of the restore: each the median, min and max over --runs processes (bench/stats.py).
`state_mib` is the size of the train state. On a CPU backend the arrays live in host memory,
so the peaks show what a restore holds; on an accelerator they show only the host's share.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import jax

from tfx.core import host_memory, parallel
from tfx.model.params import placed
from tfx.model.transformer import count_params
from tfx.train import steps
from tfx.train.checkpoint import Checkpoints

import options
from peak import cpu_name
from stats import summary

INTO = ("abstract", "random")


def _max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux.


def _child(args, workdir: str):
    """Saves the initial state into `workdir` (--child save), or restores it into --child
    abstract|random and prints {"start_rss_mib", "peak_rss_mib", "restore_s"}."""
    host_memory.keep_freed_memory_on_cpu()
    config = options.load_config(args)
    mesh = parallel.make_mesh(config.mesh_shape)
    _, abstract, shardings = steps.abstract_train_state(config, mesh)
    if args.child == "save":
        checkpoints = Checkpoints(workdir, config)
        checkpoints.save(steps.random_state(config, shardings))
        checkpoints.wait()
        checkpoints.close()
        return
    start_rss = _max_rss_mib()
    into = placed(abstract, shardings)
    if args.child == "random":
        into = jax.block_until_ready(steps.random_state(config, shardings))
    start = time.perf_counter()
    step, state = Checkpoints(workdir).resume(into)
    jax.block_until_ready(state)
    restore_s = time.perf_counter() - start
    assert step == 0, step
    print(json.dumps(dict(start_rss_mib=start_rss, peak_rss_mib=_max_rss_mib(), restore_s=restore_s)))


def main():
    parser = options.parser(__doc__)
    parser.add_argument("--runs", type=int, default=3, help="processes per way of restoring")
    parser.add_argument("--child", choices=("save", *INTO), help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return _child(args, args.workdir)
    config = options.load_config(args)
    _, abstract, _ = steps.abstract_train_state(config, parallel.make_mesh(config.mesh_shape))
    state_bytes = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(abstract))
    figures = {into: [] for into in INTO}
    with tempfile.TemporaryDirectory(prefix="tfx-restore-memory-") as workdir:
        command = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--workdir", workdir]
        subprocess.run([*command, "--child", "save"], check=True)
        for _ in range(args.runs):
            for into in INTO:  # alternated, so that a busy spell of the machine hits both.
                out = subprocess.run([*command, "--child", into], check=True, capture_output=True,
                                     text=True).stdout
                figures[into].append(json.loads(out.strip().splitlines()[-1]))
    print(json.dumps(dict(
        config=args.config, variant=config.variant, platform=jax.devices()[0].platform,
        cpu=cpu_name(), params=count_params(abstract.params), state_mib=round(state_bytes / 2**20, 1),
        runs=args.runs,
        **{name: {into: summary(f[name] for f in figures[into]) for into in INTO}
           for name in ("peak_rss_mib", "start_rss_mib", "restore_s")},
    )))


if __name__ == "__main__":
    main()
