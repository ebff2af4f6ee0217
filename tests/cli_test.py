"""The command-line scaffold: a run directory's config.json is all eval.py and translate.py
need, --config may change only what may change at inference, errors are one line, flags have
one spelling (the old one an alias), and no CLI wakes a TPU backend the host does not have."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
from absl import flags

from tfx.core import cli
from tfx.core import config as config_lib
from tfx.infer import trained as trained_lib
from tfx.infer.translate import Translator

from runs import MULTI30K, ROOT

TPU_TRACE = "could not determine TPU accelerator type"


def command(script: str, *args: str, stdin: str | None = None, env: dict | None = None
            ) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], input=stdin,
                          capture_output=True, text=True, env=env or dict(os.environ, JAX_PLATFORMS="cpu"))


def test_a_saved_config_comes_back_with_the_schemas_types():
    config = config_lib.load(MULTI30K)
    config.model.emb_dim = 32
    loaded = config_lib.from_json(config.to_json(indent=2), "config.json")
    assert loaded == config and loaded.model.emb_dim == 32
    assert isinstance(loaded.logical_axis_rules[0], tuple)  # JSON gave lists.
    assert isinstance(loaded.learning_rate, float)
    saved = json.loads(config.to_json())
    saved["model"]["width"] = 3
    with pytest.raises(ValueError, match=r"x/config.json: config.model.width is not a key"):
        config_lib.from_json(json.dumps(saved), "x/config.json")


def test_inference_may_change_decoding_but_not_the_model():
    run = config_lib.load(MULTI30K)
    run.model.emb_dim = 32
    config = config_lib.for_inference(run, "r/config.json", overrides={"decode.beam_size": 2})
    assert config.decode.beam_size == 2 and config.model.emb_dim == 32 and run.decode.beam_size != 2
    assert config_lib.for_inference(run, "r/config.json", overrides={"model.dtype": "float32"}
                                    ).model.dtype == "float32"  # computing, not the model
    with pytest.raises(ValueError, match=r"^--config: model.emb_dim=64 differs from the run's 32 "
                                         r"\(r/config.json\); a run's model cannot change at inference.$"):
        config_lib.for_inference(run, "r/config.json", overrides={"model.emb_dim": 64})
    with pytest.raises(ValueError, match=r"tokenizer.model_path='sp.model' differs from the run's ''"):
        config_lib.for_inference(run, "r/config.json", overrides={"tokenizer.model_path": "sp.model"})
    with pytest.raises(ValueError, match=r"model.emb_dim=256 differs from the run's 32"):
        config_lib.for_inference(run, "r/config.json", given=config_lib.load(MULTI30K))
    assert config_lib.for_inference(None, "r/config.json", given=run) is run  # no config.json: as given.
    with pytest.raises(FileNotFoundError, match="r/config.json does not exist"):
        config_lib.for_inference(None, "r/config.json")


def test_the_old_hyphenated_spelling_is_an_alias():
    values = flags.FlagValues()
    flags.DEFINE_integer("top_k", None, "", flag_values=values)
    flags.DEFINE_alias("top-k", "top_k", flag_values=values)
    values(["prog", "--top-k=3"])
    assert values.top_k == 3


def test_a_run_directory_alone_evaluates_and_translates(trained, tmp_path):
    """The session's tiny run (emb_dim 32, ... where configs/multi30k.py has 256) decodes
    greedily. With --workdir alone: eval.py scores a split given by an override, translate.py
    gives the in-process translations, and a decoding override (beam search of 2) is honoured.
    A model override, or a config file whose model is not the run's, is refused in one line."""
    config, workdir = trained
    (tmp_path / "small.en").write_text("A dog runs.\nTwo men sit.\n", encoding="utf-8")
    (tmp_path / "small.de").write_text("Ein Hund rennt.\nZwei Männer sitzen.\n", encoding="utf-8")
    done = command("eval.py", f"--workdir={workdir}", f"--config.data.test=text:{tmp_path / 'small'}")
    assert done.returncode == 0, done.stderr[-2000:]
    assert set(json.loads(done.stdout.splitlines()[-1])) == {"bleu", "chrf"}

    lines = ["A man is riding a bike.", "Two dogs play in the snow."]
    done = command("translate.py", f"--workdir={workdir}", stdin="".join(f"{line}\n" for line in lines))
    assert done.returncode == 0, done.stderr[-2000:]
    expected, _ = Translator(trained_lib.load(config, workdir)).translate(lines)
    assert done.stdout.splitlines() == [hypotheses[0].text for hypotheses in expected]

    done = command("translate.py", f"--workdir={workdir}", "--nbest=2", "--config.decode.strategy=beam",
                   "--config.decode.beam_size=2", stdin="A dog.\n")
    assert done.returncode == 0, done.stderr[-2000:]
    assert [line.split("\t")[:2] for line in done.stdout.splitlines()] == [["0", "1"], ["0", "2"]]

    source = os.path.join(workdir, "config.json")
    done = command("eval.py", f"--workdir={workdir}", "--config.model.emb_dim=64")
    assert done.returncode == 1 and done.stderr.strip().splitlines() == [
        f"eval.py: --config: model.emb_dim=64 differs from the run's 32 ({source}); a run's model "
        "cannot change at inference."]
    done = command("translate.py", f"--config={MULTI30K}", f"--workdir={workdir}")
    assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1
    assert done.stderr.startswith("translate.py: --config: model.") and "differs from the run's" in done.stderr


def test_an_averaged_run_is_a_run_directory_of_its_own(trained, tmp_path):
    """`tfx.compress.average --workdir W` writes the source's config.json and tokenizer beside
    the averaged checkpoint, so the tools read the output with --workdir alone."""
    config, workdir = trained
    output = str(tmp_path / "average2")
    done = subprocess.run([sys.executable, "-m", "tfx.compress.average", f"--workdir={workdir}",
                           "--last=2", f"--output={output}"], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert config_lib.load_run(output) == config_lib.load_run(workdir)
    with open(os.path.join(output, "tokenizer.model"), "rb") as copy, \
            open(os.path.join(workdir, "tokenizer.model"), "rb") as original:
        assert copy.read() == original.read()
    done = subprocess.run([sys.executable, "-m", "tfx.compress.sparsity", f"--workdir={output}"],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.splitlines()[-1])["checkpoint"] == "step6"


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="needs libtpu (the tpu extra)")
@pytest.mark.skipif(cli.has_tpu(), reason="needs a host without a TPU")
def test_no_cli_prints_libtpus_trace_on_a_host_without_a_tpu(trained):
    """libtpu prints its trace when JAX starts its backends with no JAX_PLATFORMS; a CLI that
    starts them (translate.py) does not. ALLOW_MULTIPLE_LIBTPU_LOAD lets libtpu get as far as
    its trace while other processes hold its lock file."""
    env = {key: value for key, value in os.environ.items() if key != "JAX_PLATFORMS"}
    env["ALLOW_MULTIPLE_LIBTPU_LOAD"] = "1"
    bare = subprocess.run([sys.executable, "-c", "import jax; jax.devices()"], capture_output=True,
                          text=True, env=env)
    if TPU_TRACE not in bare.stderr:
        pytest.skip("this libtpu prints no trace here")
    done = command("translate.py", f"--workdir={trained[1]}", stdin="A dog.\n", env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert TPU_TRACE not in done.stderr and "libtpu" not in done.stderr
