"""SentencePiece tokenizer: a joint source+target vocabulary, trained once and cached.

Ids follow T5 and the Flax WMT example: 0 pad (also the decoder's start token), 1 end of
sentence, 2 unknown. Text is not normalised, extra whitespace is kept and unknown characters
fall back to bytes, so `decode(encode(text)) == text` for any UTF-8 line: BLEU is computed on
exactly the detokenized text.
"""
from __future__ import annotations

import hashlib
import os
import random
import re
import tempfile
from collections.abc import Callable, Iterable, Sequence

import ml_collections
import sentencepiece as spm

from tfx.core import files
from tfx.core.config import TOKENIZER_MODEL_TYPES, choice_error
from tfx.data.sources import PairSource, default_data_dir

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2


class Tokenizer:
    """A loaded SentencePiece model; `path` names the file it came from (local or gs://)."""

    def __init__(self, path: str):
        if not files.path(path).is_file():
            raise FileNotFoundError(f"tokenizer model {path!r} does not exist.")
        try:  # from bytes: SentencePiece opens local files only.
            self.processor = spm.SentencePieceProcessor(model_proto=files.path(path).read_bytes())
        except RuntimeError as error:
            raise ValueError(
                f"tokenizer model {path!r} is not a valid SentencePiece model ({error}); "
                "delete it to retrain, or point config.tokenizer.model_path at a good one."
            ) from None
        self.path = path
        if (self.processor.pad_id(), self.processor.eos_id()) != (PAD_ID, EOS_ID):
            raise ValueError(
                f"tokenizer model {path!r} has pad id {self.processor.pad_id()} and eos id "
                f"{self.processor.eos_id()}; tfx needs pad {PAD_ID} and eos {EOS_ID}."
            )

    @property
    def vocab_size(self) -> int:
        return self.processor.vocab_size()

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, ending with EOS."""
        return self.processor.encode(text) + [EOS_ID]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids` up to the first EOS, padding ignored, on one line: line breaks that
        byte pieces spell (a barely trained model makes them) become spaces, so one sentence
        stays one line of a hypotheses file."""
        ids = list(ids)
        if EOS_ID in ids:
            ids = ids[: ids.index(EOS_ID)]
        return " ".join(self.processor.decode([int(i) for i in ids if i != PAD_ID]).splitlines())


def train_or_load(sentences: Callable[[], Iterable[str]], content_key: str, cache_dir: str,
                  vocab_size: int, model_type: str = "unigram", character_coverage: float = 1.0
                  ) -> Tokenizer:
    """Trains a joint vocabulary on `sentences()` (source and target text), or loads the model
    cached in `cache_dir` under a hash of `content_key` (what identifies the sentences) and the
    settings. The model is written to a temporary name and renamed, so a crash never leaves
    half a file.
    """
    if model_type not in TOKENIZER_MODEL_TYPES:
        raise choice_error("tokenizer.model_type", model_type, TOKENIZER_MODEL_TYPES)
    settings = dict(vocab_size=vocab_size, model_type=model_type,
                    character_coverage=character_coverage, content=content_key)
    digest = hashlib.sha256(repr(sorted(settings.items())).encode()).hexdigest()[:16]
    path = os.path.join(cache_dir, f"spm-{model_type}-{vocab_size}-{digest}.model")
    if os.path.exists(path):
        return Tokenizer(path)
    os.makedirs(cache_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as scratch:
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(sentences()), model_prefix=os.path.join(scratch, "spm"),
                vocab_size=vocab_size, model_type=model_type, character_coverage=character_coverage,
                pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID, bos_id=-1, byte_fallback=True,
                normalization_rule_name="identity", remove_extra_whitespaces=False,
                max_sentence_length=1 << 16, num_threads=os.cpu_count() or 1, minloglevel=2)
        except RuntimeError as error:
            too_big = re.search(r"<= (\d+)", str(error))
            if too_big:
                raise ValueError(
                    f"config.model.vocab_size={vocab_size} is larger than the training text "
                    f"({content_key}) supports; use at most {too_big.group(1)}."
                ) from None
            too_small = re.search(r"smaller than required_chars\. \d+ vs (\d+)", str(error))
            if too_small:
                raise ValueError(
                    f"config.model.vocab_size={vocab_size} is smaller than the characters and "
                    f"256 byte pieces of the training text ({content_key}) need; use at least "
                    f"{too_small.group(1)}."
                ) from None
            raise
        files.copy_file(os.path.join(scratch, "spm.model"), path)
    return Tokenizer(path)


def sample_sentences(pairs, max_sentences: int, seed: int = 0) -> Iterable[str]:
    """Source and target text of `pairs` (random access, `pairs[i]` -> {"source", "target"}):
    all of them, or of max_sentences // 2 pairs sampled with `seed` when max_sentences > 0."""
    indices = range(len(pairs))
    if 0 < max_sentences < 2 * len(pairs):
        indices = sorted(random.Random(seed).sample(indices, max(1, max_sentences // 2)))
    for index in indices:
        pair = pairs[index]
        yield pair["source"]
        yield pair["target"]


def from_config(config: ml_collections.ConfigDict, train: PairSource) -> Tokenizer:
    """config.tokenizer.model_path if set, else the vocabulary trained on (a sample of) the
    training split, cached under <data_dir>/tfx_tokenizers."""
    settings = config.tokenizer
    if settings.model_path:
        return Tokenizer(settings.model_path)
    sample = settings.input_sentence_size
    return train_or_load(
        lambda: sample_sentences(train, sample, config.seed),
        content_key=f"{train.fingerprint}:{config.data.source_lang}-{config.data.target_lang}:"
                    f"sample={sample}:seed={config.seed}",
        cache_dir=os.path.join(default_data_dir(config.data.data_dir), "tfx_tokenizers"),
        vocab_size=config.model.vocab_size, model_type=settings.model_type,
        character_coverage=settings.character_coverage)


def check_vocab_size(tokenizer: Tokenizer, config: ml_collections.ConfigDict):
    """Raises ValueError when `tokenizer` does not have config.model.vocab_size pieces."""
    if tokenizer.vocab_size != config.model.vocab_size:
        raise ValueError(f"config.model.vocab_size={config.model.vocab_size} but the tokenizer "
                         f"{tokenizer.path} has {tokenizer.vocab_size} pieces.")
