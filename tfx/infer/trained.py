"""A trained run, loaded for inference: restored parameters on the config's mesh, and the
run's own tokenizer.

    model = trained.load(config, "runs/multi30k", checkpoint="average:5")
    model.params, model.tokenizer, model.mesh, model.graphdef, model.params_shardings

The parameters are restored into `tfx.model.params.abstract_params`' tree: no optimizer state
is built. The tokenizer is the copy training leaves in the workdir (`tokenizer.model`, or a
mapped tokenizer's `source.spm`, `target.spm` and `vocabulary.json`), else the one
config.tokenizer names, else the vocabulary the config trains on its train split (as train.py
does, cached in the data dir), so a run directory with its config is all that translation and
evaluation need. config.data.target_lang_token, which may change at inference, applies to each.
"""
from __future__ import annotations

import ml_collections

from tfx.core import distributed, files, parallel
from tfx.data import corpora
from tfx.data import tokenizer as tokenizer_lib
from tfx.model import shortlist
from tfx.model.params import abstract_params
from tfx.train.rundir import TrainedModel, restore_params


def tokenizer_for(config: ml_collections.ConfigDict, workdir: str) -> tokenizer_lib.BaseTokenizer:
    """The run's tokenizer (see the module doc), checked against model.vocab_size and the
    tokenizer config.decode.shortlist was learned with."""
    tokenizer = tokenizer_lib.from_directory(config, workdir) or tokenizer_lib.named(config)
    if tokenizer is None:
        with distributed.process_0_first("tfx: tokenizer ready"):
            tokenizer = tokenizer_lib.from_config(config, corpora.open_split(config, "train"))
    tokenizer_lib.check_vocab_size(tokenizer, config)
    if config.decode.shortlist:
        shortlist.check_tokenizer(config.decode.shortlist, tokenizer.fingerprint,
                                  f"the {tokenizer.description}")
    return tokenizer


def load(config: ml_collections.ConfigDict, workdir: str, checkpoint: str = "latest") -> TrainedModel:
    """The run in `workdir` with `checkpoint` restored onto `config.mesh_shape` (parameters
    only: no optimizer state is built), and its tokenizer (`tokenizer_for`, first: a wrong
    config.data.target_lang_token fails before the checkpoint is read)."""
    if not files.path(workdir).is_dir():
        raise FileNotFoundError(f"workdir {workdir!r} does not exist.")
    tokenizer = tokenizer_for(config, workdir)
    mesh = parallel.make_mesh(config.mesh_shape)
    graphdef, abstract, shardings = abstract_params(config, mesh)
    label, params = restore_params(workdir, checkpoint, abstract)
    return TrainedModel(config, mesh, graphdef, params, shardings, tokenizer, label)
