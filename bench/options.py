"""The command-line options the model benchmarks share: a config and what to override in it."""
from __future__ import annotations

import argparse

import ml_collections

from tfx.core import config as config_lib
from tfx.core import precision


def parser(description: str) -> argparse.ArgumentParser:
    """An argument parser with --config, --mesh, --per_device_batch_size, --dtype, --remat,
    --scan_layers and --bfloat16_logits."""
    result = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    result.add_argument("--config", default="configs/wmt_base.py:base")
    result.add_argument("--mesh", default=None, help="overrides config.mesh_shape, e.g. data:-1")
    result.add_argument("--per_device_batch_size", "--per-device-batch-size", type=int, default=None,
                        help="overrides config.per_device_batch_size (rows per data-parallel device)")
    result.add_argument("--dtype", default=None, choices=config_lib.DTYPES,
                        help="overrides config.model.dtype (the computation dtype)")
    result.add_argument("--remat", default=None, choices=config_lib.REMAT_POLICIES,
                        help="overrides config.model.remat")
    result.add_argument("--scan_layers", "--scan-layers", action="store_true", help="sets config.model.scan_layers")
    result.add_argument("--bfloat16_logits", "--bfloat16-logits", action="store_true",
                        help="config.model.float32_logits=False: the output projection in model.dtype")
    return result


def load_config(args: argparse.Namespace) -> ml_collections.ConfigDict:
    """The config of --config with the other options applied, validated."""
    config = config_lib.load(args.config)
    if args.mesh:
        config.mesh_shape = args.mesh
    if args.per_device_batch_size:
        config.per_device_batch_size = args.per_device_batch_size
    if args.dtype:
        config.model.dtype = args.dtype
    if args.remat:
        config.model.remat = args.remat
    if args.scan_layers:
        config.model.scan_layers = True
    if args.bfloat16_logits:
        config.model.float32_logits = False
    config.model.dtype = precision.resolve(config.model.dtype)
    return config_lib.validate(config)
