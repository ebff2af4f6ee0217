"""docs/opus_mt.md's commands run as written on a tiny random Marian model: convert, evaluate,
fine-tune on Multi30k, evaluate again, translate and export. The fine-tune's loss falls, and its
parameters restore (eval.py, translate.py) and decode.

One test over 30 seconds (six commands, each a process that starts JAX and compiles): the
page's promise is that its commands work in sequence, so they run in sequence. Tiny sizes are
added as --config overrides (steps, batches, lengths, a learning rate that moves a random model
in 40 steps, the tests' plain decoding); nothing of the commands themselves changes.
"""
import os
import re
import shlex
import subprocess
import sys

import ctranslate2

import marian_models
from runs import PLAIN_DECODE_KEYS, ROOT, flags_for, losses

PAGE = os.path.join(ROOT, "docs", "opus_mt.md")
DATA = os.path.join(ROOT, "data", "multi30k-en-de")
LINES = {"train": 600, "valid": 16, "test": 16}
TINY = {  # appended to the page's commands, by script.
    "train.py": ["--config.num_train_steps=40", "--config.warmup_steps=5", "--config.learning_rate=3e-3",
                 "--config.per_device_batch_size=2", "--config.log_every_steps=5",
                 "--config.eval_every_steps=0", "--config.checkpoint_every_steps=40",
                 "--config.max_source_length=48", "--config.max_target_length=48"],
    **{script: ["--config.per_device_eval_batch_size=2", *flags_for(PLAIN_DECODE_KEYS)]
       for script in ("eval.py", "translate.py")},
}


def page_commands() -> list[list[str]]:
    """The commands of the page's bash block that converts a model, continued lines joined."""
    blocks = re.findall(r"```bash\n(.*?)```", open(PAGE, encoding="utf-8").read(), re.S)
    block = next(b for b in blocks if "tfx.convert marian" in b)
    return [shlex.split(line) for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def lay_out(directory: str, commands: list[list[str]]):
    """The page's files in `directory`: the tiny model under the names its --model, --vocab and
    --*_spm flags give, Multi30k lines as mydata/, and the scripts and configs."""
    files = marian_models.write_marian_model(os.path.join(directory, "marian"), "post_relu_tied")
    convert = next(c for c in commands if "tfx.convert" in c)
    given = dict(zip(convert[4::2], convert[5::2]))
    for flag, path in (("--model", files.model), ("--vocab", files.vocabs[0]),
                       ("--source_spm", files.source_spm), ("--target_spm", files.target_spm)):
        os.makedirs(os.path.join(directory, os.path.dirname(given[flag])), exist_ok=True)
        os.symlink(path, os.path.join(directory, given[flag]))
    os.makedirs(os.path.join(directory, "mydata"))
    for split, count in LINES.items():
        name = {"train": "train", "valid": "valid", "test": "test_2016_flickr"}[split]
        for lang in ("en", "de"):
            with open(os.path.join(DATA, f"{name}.{lang}"), encoding="utf-8") as f:
                lines = [next(f) for _ in range(count)]
            with open(os.path.join(directory, "mydata", f"{split}.{lang}"), "w", encoding="utf-8") as f:
                f.writelines(lines)
    for name in ("train.py", "eval.py", "translate.py", "configs"):
        os.symlink(os.path.join(ROOT, name), os.path.join(directory, name))


def run(command: list[str], directory: str) -> str:
    script = command[1]
    argv = [sys.executable, *command[1:], *TINY.get(script, [])]
    done = subprocess.run(argv, cwd=directory, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{shlex.join(command)}\n{done.stderr[-3000:]}"
    return done.stdout


def test_the_pages_commands_convert_evaluate_fine_tune_translate_and_export(tmp_path):
    directory = str(tmp_path)
    commands = page_commands()
    assert [c[1] for c in commands] == ["-m", "eval.py", "train.py", "eval.py", "translate.py", "-m"]
    lay_out(directory, commands)
    outputs = [run(command, directory) for command in commands]

    assert "imported" in outputs[0] and os.path.exists(f"{directory}/runs/opus-mt-en-de/vocabulary.json")
    for before_or_after in (outputs[1], outputs[3]):
        assert re.search(r"BLEU", before_or_after), before_or_after
    train_losses = losses(f"{directory}/runs/opus-mt-en-de-ft")
    assert sorted(train_losses) == list(range(5, 41, 5))
    assert train_losses[40] < 0.8 * train_losses[5], train_losses
    with open(f"{directory}/test.de", encoding="utf-8") as f:
        translations = f.read().splitlines()
    assert len(translations) == LINES["test"] and any(translations)

    exported = f"{directory}/runs/opus-mt-en-de-ft-ct2"
    assert {"source.spm", "target.spm", "model.bin"} <= set(os.listdir(exported))
    translator = ctranslate2.Translator(exported, device="cpu")
    assert translator.translate_batch([["▁A", "▁dog"]], max_decoding_length=10)[0].hypotheses[0]
