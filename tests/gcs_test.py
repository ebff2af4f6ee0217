"""Runs on Cloud Storage (gs://), against the emulator on loopback (tests/gcs_emulator.py): train,
resume, evaluate, translate and export with a gs:// workdir, as subprocesses; text data in the
bucket; a gs:// data dir refused; and metrics.jsonl, which Cloud Storage cannot append to.
"""
import json
import os
import subprocess
import sys
import uuid


from tfx.core import files
from tfx.data.sources import read_lines
from tfx.train.metrics import read_metrics

from runs import MULTI30K, ROOT, finish, train_py


def names(directory: str) -> list[str]:
    return sorted(p.name for p in files.path(directory).iterdir())


METRICS = """
import sys
from tfx.train.metrics import MetricWriter
writer = MetricWriter(sys.argv[1])
for step in sys.argv[2:]:
    writer.write("train", int(step), {"loss": 1 / int(step)})
writer.close()
"""


def test_metrics_jsonl_on_cloud_storage_is_rewritten_whole_keeping_complete_lines(gcs_bucket):
    """(In subprocesses: tensorboardX uploads its events file again when the writer is garbage
    collected, which here would be after the emulator stopped.)"""
    workdir = f"{gcs_bucket}/metrics-{uuid.uuid4().hex[:8]}"
    tool("-c", METRICS, workdir, "1", "2")
    path = files.path(workdir) / "metrics.jsonl"
    lines = path.read_text().splitlines()
    assert [json.loads(line) for line in lines] == [{"split": "train", "step": 1, "loss": 1.0},
                                                    {"split": "train", "step": 2, "loss": 0.5}]
    files.write_text(path, path.read_text() + '{"split": "train", "st')  # a cut-off last line.

    tool("-c", METRICS, workdir, "3", "4")  # a resumed run: the lines so far, without the cut one.
    resumed = [json.dumps({"split": "train", "step": step, "loss": 1 / step}) for step in (3, 4)]
    assert path.read_text().splitlines() == [*lines, *resumed]
    assert [r["step"] for r in read_metrics(workdir)] == [1, 2, 3, 4]
    assert any(name.startswith("events.out.tfevents") for name in names(f"{workdir}/tensorboard"))


def tool(*command: str) -> str:
    """Runs a tool of this repository (`python <command>`); returns its stdout."""
    done = subprocess.run([sys.executable, *command], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_train_resume_evaluate_translate_and_export_with_the_run_in_a_bucket(gcs_bucket, data_dir,
                                                                            tmp_path):
    """The run in the bucket, resumed, gives the losses of an uninterrupted run on local disk.
    (The rsqrt schedule does not depend on num_train_steps, so a run planned for 4 steps and
    resumed to 6 compiles the same steps as one planned for 6.)"""
    root = f"{gcs_bucket}/run-{uuid.uuid4().hex[:8]}"
    workdir, text = f"{root}/run", f"{root}/text/valid"
    for language in ("en", "de"):  # in the bucket: eval.py's test split, translate.py's input.
        lines = list(read_lines(os.path.join(ROOT, "data", "multi30k-en-de", f"valid.{language}")))[:16]
        files.write_text(f"{text}.{language}", "".join(line + "\n" for line in lines))

    run = dict(checkpoint_every_steps=2, schedule="rsqrt")
    out, _ = finish(train_py(workdir, data_dir, num_train_steps=4, **run))
    assert "step 4/4" in out
    # Beside the resume below, once the data is prepared.
    local = train_py(str(tmp_path / "local"), data_dir, num_train_steps=6, **run)
    written = {"checkpoints", "config.json", "metrics.jsonl", "tensorboard", "tokenizer.model"}
    assert written <= set(names(workdir))
    assert names(f"{workdir}/checkpoints") == ["2", "4"]
    assert any(name.startswith("events.out.tfevents") for name in names(f"{workdir}/tensorboard"))

    out, _ = finish(train_py(workdir, data_dir, num_train_steps=6, **run))
    assert f"resuming from step 4 in {workdir}/checkpoints" in out
    train = [r for r in read_metrics(workdir) if r["split"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    finish(local)
    local_train = [r for r in read_metrics(str(tmp_path / "local")) if r["split"] == "train"]
    assert [r["loss"] for r in train] == [r["loss"] for r in local_train]
    assert train[4]["wall_time_s"] > train[3]["wall_time_s"]  # the clock went on from the first run's.
    assert len(files.path(f"{workdir}/metrics.jsonl").read_text().splitlines()) == 6
    assert names(f"{workdir}/checkpoints") == ["2", "4", "6"]

    refused = subprocess.run([sys.executable, "eval.py", f"--workdir={workdir}",
                              f"--config.data.data_dir={root}/tfds"], capture_output=True, text=True,
                             cwd=ROOT, timeout=300)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert refused.stderr.strip().splitlines()[-1] == (
        f"eval.py: config.data.data_dir='{root}/tfds' (or $TFDS_DATA_DIR) is not on local disk: "
        "tfx prepares and reads data on local disk only (array_record writes local files, and "
        "reads gs:// one request per record); set it to a local directory DIR, and to use data "
        f"prepared there, first copy it: gcloud storage cp -r {root}/tfds/* DIR")

    split = [f"--config.data.test=text:{text}", f"--config.data.data_dir={data_dir}"]
    out = tool("eval.py", f"--workdir={workdir}", "--config.decode.beam_size=1", *split)
    scores = json.loads(out.strip().splitlines()[-1])
    assert set(scores) == {"bleu", "chrf"}
    hypotheses = files.path(f"{workdir}/test-step6.hyp.txt").read_text().splitlines()
    assert len(hypotheses) == 16 and files.path(f"{workdir}/test-step6.json").exists()

    tool("translate.py", f"--workdir={workdir}", f"--input={text}.en", f"--output={root}/valid.de",
         "--beam=1")
    assert len(files.path(f"{root}/valid.de").read_text().splitlines()) == 16

    out = tool("-m", "tfx.export", "ctranslate2", f"--workdir={workdir}", f"--output={root}/ct2")
    assert f"to {root}/ct2 as CTranslate2 float32" in out
    assert names(f"{root}/ct2") == ["config.json", "model.bin", "sentencepiece.model",
                                    "shared_vocabulary.json", "tfx_config.json"]
    assert (files.path(f"{root}/ct2/sentencepiece.model").read_bytes()
            == files.path(f"{workdir}/tokenizer.model").read_bytes())


def test_a_gs_workdir_without_gcsfs_is_refused_in_one_line(tmp_path):
    blocker = tmp_path / "gcsfs.py"
    blocker.write_text("raise ImportError('No module named gcsfs')\n")
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    done = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), f"--config={MULTI30K}",
                           "--workdir=gs://tfx-test/nowhere"], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=300)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        "train.py: gs://tfx-test/nowhere: gs:// paths need gcsfs and google-cloud-storage; "
        "install them with pip install 'tfx-mt[gcs]'")
