import os
import shutil

import jax

from tfx.core import parallel
from tfx.data.sources import default_data_dir
from tfx.infer import evaluate
from tfx.infer import trained as trained_lib
from tfx.infer.translate import Translator
from tfx.model.params import abstract_params
from tfx.train import steps

from runs import ROOT

TEST = os.path.join(ROOT, "data", "multi30k-en-de", "test_2016_flickr")
SENTENCES = ["A man in a blue shirt is riding a bicycle.", "", "Two dogs play in the snow."]


def test_a_run_whose_data_dir_tokenizer_is_deleted_evaluates_and_translates_as_before(trained, tmp_path):
    """One tokenizer rule for eval.py and translate.py: the run's own tokenizer.model first. With
    the data dir's cached SentencePiece model deleted, both give the same output as before, and
    no tokenizer is trained again."""
    config, workdir = trained
    config = config.copy_and_resolve_references()
    config.data.data_dir = str(tmp_path / "data")
    shutil.copytree(default_data_dir(trained[0].data.data_dir), config.data.data_dir)
    run = str(tmp_path / "run")
    shutil.copytree(workdir, run)
    for lang in ("en", "de"):  # a short test split: decoding all of test2016 twice adds nothing.
        with open(f"{TEST}.{lang}", encoding="utf-8") as f:
            (tmp_path / f"short.{lang}").write_text("".join(f.readlines()[:24]), encoding="utf-8")
    config.data.test = f"text:{tmp_path / 'short'}"

    def outputs():
        results = evaluate.evaluate_checkpoint(config, run, "test", "latest", ("bleu", "chrf"))
        with open(results["hypotheses"], encoding="utf-8") as f:
            hypotheses = f.read()
        translations, _ = Translator(trained_lib.load(config, run)).translate(SENTENCES)
        scores = {name: score["score"] for name, score in results["scores"].items()}
        return hypotheses, scores, [[h.text for h in found] for found in translations]

    before = outputs()
    cache = os.path.join(config.data.data_dir, "tfx_tokenizers")
    assert os.listdir(cache)  # the tokenizer training cached there.
    shutil.rmtree(cache)
    after = outputs()
    assert after == before
    assert len(before[0].splitlines()) == 24 and before[2][1] == [""]
    assert not os.path.exists(cache)


def test_abstract_params_place_the_parameters_as_the_train_state_does(tiny_config):
    """Inference's restore target has the train state's parameter shapes, dtypes and
    shardings, and nothing else."""
    config = tiny_config(mesh_shape="data:2,fsdp:2,tensor:2")
    mesh = parallel.make_mesh(config.mesh_shape)
    graphdef, abstract, shardings = abstract_params(config, mesh)
    train_graphdef, train_abstract, train_shardings = steps.abstract_train_state(config, mesh)
    assert graphdef == train_graphdef
    assert jax.tree.structure(abstract) == jax.tree.structure(train_abstract.params)
    for leaf, train_leaf, sharding, train_sharding in zip(
            *map(jax.tree.leaves, (abstract, train_abstract.params, shardings, train_shardings.params))):
        assert (leaf.shape, leaf.dtype) == (train_leaf.shape, train_leaf.dtype)
        assert leaf.sharding == sharding == train_sharding
    assert any(not s.is_fully_replicated for s in jax.tree.leaves(shardings))
