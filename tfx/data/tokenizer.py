"""SentencePiece tokenizer: a joint source+target vocabulary, trained once and cached.

Ids follow T5 and the Flax WMT example: 0 pad (also the decoder's start token), 1 end of
sentence, 2 unknown. Text is not normalised, extra whitespace is kept and unknown characters
fall back to bytes, so `decode(encode(text)) == text` for any UTF-8 line: BLEU is computed on
exactly the detokenized text.
"""
from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import Sequence

import sentencepiece as spm

from tfx.config import TOKENIZER_MODEL_TYPES, choice_error

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2


class Tokenizer:
    """A loaded SentencePiece model; `path` names the file it came from."""

    def __init__(self, path: str):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer model {path!r} does not exist.")
        try:
            self.processor = spm.SentencePieceProcessor(model_file=path)
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
        """Text of `ids` up to the first EOS, padding ignored."""
        ids = list(ids)
        if EOS_ID in ids:
            ids = ids[: ids.index(EOS_ID)]
        return self.processor.decode([int(i) for i in ids if i != PAD_ID])


def _fingerprint(files: Sequence[str], settings: dict) -> str:
    """Hash of the training files' bytes and the trainer settings: the cache key."""
    digest = hashlib.sha256(repr(sorted(settings.items())).encode())
    for path in files:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def train_or_load(files: Sequence[str], cache_dir: str, vocab_size: int, model_type: str = "unigram",
                  character_coverage: float = 1.0, input_sentence_size: int = 0) -> Tokenizer:
    """Trains a joint vocabulary on `files` (source and target text, one sentence per line), or
    loads the one cached in `cache_dir` under a hash of those files and these settings.

    input_sentence_size > 0 trains on that many randomly sampled lines (for big corpora).
    The model is written to a temporary name and renamed, so a crash never leaves half a file.
    """
    if model_type not in TOKENIZER_MODEL_TYPES:
        raise choice_error("tokenizer.model_type", model_type, TOKENIZER_MODEL_TYPES)
    for path in files:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer training file {path!r} does not exist.")
    settings = dict(vocab_size=vocab_size, model_type=model_type,
                    character_coverage=character_coverage, input_sentence_size=input_sentence_size)
    path = os.path.join(cache_dir, f"spm-{model_type}-{vocab_size}-{_fingerprint(files, settings)}.model")
    if os.path.exists(path):
        return Tokenizer(path)
    os.makedirs(cache_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as scratch:
        try:
            spm.SentencePieceTrainer.train(
                input=",".join(files), model_prefix=os.path.join(scratch, "spm"),
                vocab_size=vocab_size, model_type=model_type, character_coverage=character_coverage,
                input_sentence_size=input_sentence_size, shuffle_input_sentence=True,
                pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID, bos_id=-1, byte_fallback=True,
                normalization_rule_name="identity", remove_extra_whitespaces=False,
                max_sentence_length=1 << 16, num_threads=os.cpu_count() or 1, minloglevel=2)
        except RuntimeError as error:
            limit = re.search(r"<= (\d+)", str(error))
            if limit:
                raise ValueError(
                    f"config.model.vocab_size={vocab_size} is larger than the training text "
                    f"({', '.join(files)}) supports; use at most {limit.group(1)}."
                ) from None
            raise
        os.replace(os.path.join(scratch, "spm.model"), path)
    return Tokenizer(path)
