"""Multi-process start-up: `jax.distributed` from the config or the cluster's environment.

Every process (one per host, or per GPU) runs the same command. `initialize` must run before any
other JAX call. It connects the processes when the config names a coordinator (or
$JAX_COORDINATOR_ADDRESS is set) or when JAX detects a cluster it knows (multi-host TPU VMs,
SLURM, Open MPI); otherwise the run is a single process and nothing happens.

Once connected, the processes send heartbeats to the coordinator (process 0). One that stays
silent for `config.distributed.heartbeat_timeout_s` (it died, or its host did) is declared
dead and the others stop with an error instead of waiting forever in a collective.
"""
from __future__ import annotations

import contextlib
import os

import jax
import ml_collections
from jax.experimental import multihost_utils


def initialize(config: ml_collections.ConfigDict) -> bool:
    """Starts jax.distributed if this run is multi-process; returns whether it did."""
    settings = config.distributed
    address = settings.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
    if not (address or settings.num_processes > 1 or _cluster_detected()):
        return False
    if settings.num_processes > 1 and not (address and settings.process_id >= 0):
        raise ValueError(
            f"config.distributed.num_processes={settings.num_processes} also needs "
            "config.distributed.coordinator_address (host:port of process 0) and "
            "config.distributed.process_id (0 .. num_processes - 1) for every process.")
    jax.distributed.initialize(
        coordinator_address=address or None,
        num_processes=settings.num_processes or None,
        process_id=settings.process_id if settings.process_id >= 0 else None,
        initialization_timeout=settings.initialization_timeout_s,
        heartbeat_timeout_seconds=settings.heartbeat_timeout_s)
    return True


def _cluster_detected() -> bool:
    """Whether JAX's own cluster detection (what `jax.distributed.initialize()` with no
    arguments uses) recognises this environment."""
    try:
        from jax._src.clusters import ClusterEnv
    except ImportError:  # moved in a newer JAX: only explicit settings start multi-process.
        return False
    return any(not env.opt_in_only_method and env.is_env_present()
               for env in ClusterEnv._cluster_types)


@contextlib.contextmanager
def process_0_first(what: str):
    """Runs the block on process 0 while the others wait, then on the others: what process 0
    caches on a shared file system (prepared data, the tokenizer) is then made only once."""
    waits = jax.process_count() > 1 and jax.process_index() != 0
    if waits:
        multihost_utils.sync_global_devices(what)
    yield
    if jax.process_count() > 1 and not waits:
        multihost_utils.sync_global_devices(what)
