"""Sequence-level knowledge distillation (Kim and Rush, 2016): a teacher's translations of its
training split, written as a parallel text corpus a student trains on.

    python -m tfx.compress.distill --workdir runs/multi30k --output runs/distilled \\
        [--checkpoint latest|STEP|average:N] [--splits train,eval] \\
        [--targets teacher|teacher+original|best-chrf] [--config.decode.beam_size=8]

writes OUTPUT/train.<source_lang> and OUTPUT/train.<target_lang> (and eval.* for data.eval):
line-aligned UTF-8, one sentence per line, so that a student config reads them with
`config.data.train = "text:OUTPUT/train"`. The targets are
- teacher: the teacher's best translation (config.decode says how it decodes);
- teacher+original: every source twice, with the teacher's translation and then with its
  reference (twice the lines);
- best-chrf: of the beam's hypotheses, the one with the highest sentence chrF against the
  reference (the selection of Mozilla's Bergamot recipe).
Pairs with an empty side are skipped, as the split reader skips them.

A split goes in chunks of `chunk_size` sentences (tfx/infer/corpus.py, which back-translation
shares): each is translated by `tfx.infer.translate.Translator` (sorted by length and batched;
results in source order) and saved atomically as OUTPUT/chunks/<split>-NNNNNN.json. The corpus
files appear, each atomically, when every chunk is there, and the chunks are then removed. A
run killed at any moment and rerun with the same arguments continues from its saved chunks and
writes the same bytes (given the same devices and batch size). OUTPUT/state.json holds what the
corpus depends on (teacher, checkpoint, tokenizer, model and decoding settings, targets, chunk
size, the splits' content): a rerun that differs in any of them is refused. OUTPUT/report.json
has, per split, the sentences, the decoding seconds, and the BLEU and chrF of the teacher's best
translations against the references.
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import sacrebleu

from tfx.core import files
from tfx.data import corpora
from tfx.infer import corpus
from tfx.infer.evaluate import score
from tfx.infer.translate import Translator

CHUNK_SIZE = 2048
TARGETS = ("teacher", "teacher+original", "best-chrf")
SPLITS = ("train", "eval")
STATE_FILE, REPORT_FILE, CHUNKS = corpus.STATE_FILE, corpus.REPORT_FILE, corpus.CHUNKS


def check_arguments(config, splits: Sequence[str], targets: str, chunk_size: int):
    """Errors naming the flag, before the teacher is loaded."""
    if targets not in TARGETS:
        raise ValueError(f"--targets={targets!r}: use one of {', '.join(TARGETS)}.")
    if targets == "best-chrf" and config.decode.strategy != "beam":
        raise ValueError(f"--targets=best-chrf chooses among the beam's hypotheses, but "
                         f"config.decode.strategy={config.decode.strategy!r}; use beam.")
    if not splits or any(split not in SPLITS for split in splits) or len(set(splits)) < len(splits):
        raise ValueError(f"--splits={','.join(splits)}: name each of {', '.join(SPLITS)} at most once.")
    for split in splits:
        if not config.data[split]:
            raise ValueError(f"--splits={','.join(splits)}: config.data.{split} is empty.")
    if chunk_size < 1:
        raise ValueError(f"--chunk_size={chunk_size} must be positive.")


def _translate_chunk(translator: Translator, records: Sequence[dict[str, str]], targets: str,
                     split: str, first: int) -> dict:
    """The teacher's translations of `records`, pairs `first`... of config.data.`split` (those
    with an empty side skipped), their references, and with best-chrf the selected hypotheses."""
    kept = [i for i, r in enumerate(records) if r["source"].strip() and r["target"].strip()]
    references = [records[i]["target"] for i in kept]
    chunk, results = corpus.translated_chunk(
        translator, [records[i]["source"] for i in kept], [first + i for i in kept],
        lambda pair, source: f"config.data.{split} pair {pair} (counted from 0; source {source!r})",
        skipped=len(records) - len(kept), nbest=translator.width() if targets == "best-chrf" else 1)
    chunk["references"] = references
    if targets == "best-chrf":
        chrf = sacrebleu.CHRF()
        chunk["selected"] = [
            max(hypotheses, key=lambda h: chrf.sentence_score(h.text, [reference]).score).text
            for hypotheses, reference in zip(results, references)]
    return chunk


def _pairs(chunk: dict, targets: str) -> list[tuple[str, str]]:
    """The corpus lines (source, target) of a chunk."""
    if targets == "teacher+original":
        return [pair for source, teacher, reference
                in zip(chunk["sources"], chunk["translations"], chunk["references"])
                for pair in ((source, teacher), (source, reference))]
    return list(zip(chunk["sources"], chunk["selected" if targets == "best-chrf" else "translations"]))


def distill_split(translator: Translator, pairs: corpora.Split, prefix: str, targets: str = "teacher",
                  chunk_size: int = CHUNK_SIZE, progress: bool = False) -> dict:
    """Writes the corpus of `pairs` as `prefix`.<source_lang> and `prefix`.<target_lang>,
    translating only the chunks not saved yet in the prefix's folder; returns the split's report."""
    name, output = os.path.basename(prefix), os.path.dirname(prefix)
    count = -(-len(pairs) // chunk_size)
    chunks = ((pairs[i] for i in range(start, min(start + chunk_size, len(pairs))))
              for start in range(0, len(pairs), chunk_size))
    report = corpus.write(
        output, name, [f"{prefix}.{language}" for language in pairs.languages], chunks,
        lambda records, first: _translate_chunk(translator, records, targets, name, first),
        lambda chunk: _pairs(chunk, targets), chunk_size, total=count, progress=progress)
    chunks = list(corpus.read_chunks(corpus.chunk_path(output, name, number) for number in range(count)))
    teacher = [text for chunk in chunks for text in chunk["translations"]]
    references = [text for chunk in chunks for text in chunk["references"]]
    report = {"spec": pairs.spec, **report, "skipped_empty": pairs.skipped_empty + report["skipped_empty"],
              "teacher_scores": score(teacher, [references])}
    if targets == "best-chrf":
        selected = [text for chunk in chunks for text in chunk["selected"]]
        report["selected_scores"] = score(selected, [references])
    return report


def distill(translator: Translator, workdir: str, output: str, splits: Sequence[str] = ("train",),
            targets: str = "teacher", chunk_size: int = CHUNK_SIZE, progress: bool = False) -> dict:
    """Writes the corpora of the teacher config's `splits` into `output` (see the module doc),
    resuming an interrupted run, and returns the report also written to OUTPUT/report.json.

    `translator` holds the teacher (its config and checkpoint); `workdir` is the teacher's run."""
    config = translator.model.config
    check_arguments(config, splits, targets, chunk_size)
    opened = {split: corpora.open_split(config, split) for split in splits}
    settings = corpus.run_settings(
        translator.model, workdir, {"--targets": targets, "--chunk_size": chunk_size},
        {f"config.data.{name} (content)": pairs.fingerprint for name, pairs in opened.items()})
    state = corpus.open_state(output, settings, "a distillation")
    for split, pairs in opened.items():
        if split not in state["done"]:
            state["done"][split] = distill_split(translator, pairs, os.path.join(output, split),
                                                 targets, chunk_size, progress)
            corpus.save_state(output, state)
        corpus.remove_chunks(output, split)
    report = {"teacher": os.fspath(files.path(workdir)), "checkpoint": translator.model.label,
              "targets": targets, "decode": config.decode.to_dict(),
              "splits": {split: state["done"][split] for split in splits}}
    corpus.write_json(os.path.join(output, REPORT_FILE), report)
    return report


def summary(report: dict) -> str:
    """The report in a few lines, for the terminal."""
    lines = [f"teacher {report['teacher']} ({report['checkpoint']}), targets {report['targets']}:"]
    for split, r in report["splits"].items():
        lines.append(f"{split} ({r['spec']}): {r['sentences']} sentences in {r['seconds']:.1f} s "
                     f"({r['sentences_per_sec']:.1f} sentences/s); {r['skipped_empty']} pairs with an "
                     f"empty side skipped, {r['truncated']} truncated, {r['empty_translations']} "
                     f"empty translations; {r['lines']} lines in "
                     f"{', '.join(r['files'])}")
        for label, key in (("teacher", "teacher_scores"), ("selected", "selected_scores")):
            for result in r.get(key, {}).values():
                lines.append(f"  {label} vs references: {result['text']}  ({result['signature']})")
    return "\n".join(lines)


def main():
    """The command line (absl flags, defined here so that importing tfx.compress.distill defines none)."""
    from absl import flags, logging

    from tfx.core import cli, host_memory
    from tfx.infer import trained

    shared = cli.define_flags(workdir="The teacher's run.", checkpoint=True)
    output = flags.DEFINE_string("output", None, "Directory for the corpus; a rerun resumes there.")
    splits = flags.DEFINE_list("splits", ["train"], "Which of config.data.train and eval to translate.")
    targets = flags.DEFINE_enum("targets", "teacher", TARGETS,
                                "The teacher's translation, it and the original, or the beam's best by chrF.")
    chunk_size = flags.DEFINE_integer("chunk_size", CHUNK_SIZE, "Sentences per resumable chunk.")
    flags.mark_flag_as_required("output")

    def run():
        config = shared.run_config()
        check_arguments(config, splits.value, targets.value, chunk_size.value)
        host_memory.keep_freed_memory_on_cpu()
        translator = Translator(trained.load(config, shared.workdir.value, shared.checkpoint.value))
        report = distill(translator, shared.workdir.value, output.value, splits.value, targets.value,
                         chunk_size.value, progress=True)
        print(summary(report))
        print(f"report: {os.path.join(output.value, REPORT_FILE)}")

    # ERROR: orbax warns of every read-only checkpoint directory.
    cli.run("tfx.compress.distill", run, verbosity=logging.ERROR)


if __name__ == "__main__":
    main()
