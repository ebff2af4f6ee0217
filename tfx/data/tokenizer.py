"""Tokenizers: text <-> ids, of two kinds with one interface (`BaseTokenizer`).

- `Tokenizer`, tfx's own: one SentencePiece model joint over source and target, trained once
  and cached (config.tokenizer.model_path, or trained on the training split).
- `MappedTokenizer`, an imported model's (OPUS-MT/Marian): a source and a target SentencePiece
  model whose pieces a vocabulary file (tfx/data/vocabulary.py) maps to one id space.

Ids follow T5 and the Flax WMT example: 0 pad (also the decoder's start token), 1 end of
sentence, 2 unknown. tfx's own model does not normalise text, keeps extra whitespace and falls
back to bytes for unknown characters, so `decode(encode_target(text)) == text` for any UTF-8
line: BLEU is computed on exactly the detokenized text.

config.data.target_lang_token (a multilingual model's output language: tfx's '<2de>', OPUS-MT's
'>>deu<<') is a piece whose id starts every source; a record of a named corpus
(tfx/data/corpora.py) brings its own pieces instead.
"""
from __future__ import annotations

import abc
import functools
import hashlib
import os
import random
import re
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence

import ml_collections
import sentencepiece as spm

from tfx.core import files
from tfx.core.config import TOKENIZER_MODEL_TYPES, choice_error
from tfx.data import corpora
from tfx.data import vocabulary as vocabulary_lib
from tfx.data.sources import default_data_dir

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
# The copies a run directory holds (rundir.keep_tokenizer): the joint model, or the mapped three.
JOINT_FILE = "tokenizer.model"
SOURCE_FILE, TARGET_FILE, VOCABULARY_FILE = "source.spm", "target.spm", "vocabulary.json"
LANGUAGE_TOKEN = re.compile(r">>\S+<<|<2\S+>")  # output-language tokens: >>deu<< (OPUS-MT), <2de>.
SHOWN_LANGUAGES = 20  # language tokens an error lists.


def fingerprint(paths: Mapping[str, str]) -> str:
    """sha256 (hex) of the bytes of the files `paths` (name -> path), in name order."""
    digest = hashlib.sha256()
    for name in sorted(paths):
        digest.update(files.path(paths[name]).read_bytes())
    return digest.hexdigest()


class BaseTokenizer(abc.ABC):
    """What both kinds give. `encode_source` and `encode_target` end with EOS (a source starts
    with `source_prefix`); `files` maps the name of each file the tokenizer is read from, as a run
    directory holds it, to its path; `description` names them for messages."""

    files: dict[str, str]
    description: str
    source_prefix: list[int]  # the id of config.data.target_lang_token, or none.

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Pieces (ids) in the vocabulary."""

    @abc.abstractmethod
    def pieces(self) -> list[str]:
        """Every piece, in id order."""

    @abc.abstractmethod
    def piece_id(self, piece: str) -> int | None:
        """The id of `piece`; None when it is not one piece of the vocabulary."""

    @abc.abstractmethod
    def _source_ids(self, text: str) -> list[int]: ...

    @abc.abstractmethod
    def _target_ids(self, text: str) -> list[int]: ...

    @abc.abstractmethod
    def _text(self, ids: list[int]) -> str:
        """Target text of `ids` (no EOS, no padding)."""

    def encode_source(self, text: str, prefix: Sequence[str] | None = None) -> list[int]:
        """Source token ids of `text`: `source_prefix` (or the ids of the pieces `prefix`), the
        text's, EOS."""
        return self._prefix_ids(prefix) + self._source_ids(text) + [EOS_ID]

    def _prefix_ids(self, prefix: Sequence[str] | None) -> list[int]:
        """`source_prefix`, or the ids of the pieces `prefix`."""
        if prefix is None:
            return self.source_prefix
        return [self._piece(p, f"the source prefix {p!r} (a corpus's language token or tag)") for p in prefix]

    def encode_target(self, text: str) -> list[int]:
        """Target token ids of `text`, ending with EOS."""
        return self._target_ids(text) + [EOS_ID]

    def encode_sources(self, texts: Sequence[str], prefix: Sequence[str] | None = None) -> list[list[int]]:
        """`encode_source` of each of `texts` (a batch: faster where the model encodes many at once)."""
        first = self._prefix_ids(prefix)
        return [first + ids + [EOS_ID] for ids in self._many_ids(texts, self._source_ids)]

    def encode_targets(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode_target` of each of `texts`."""
        return [ids + [EOS_ID] for ids in self._many_ids(texts, self._target_ids)]

    def _many_ids(self, texts: Sequence[str], one: Callable[[str], list[int]]) -> list[list[int]]:
        return [one(text) for text in texts]

    def decode(self, ids: Sequence[int]) -> str:
        """Target text of `ids` up to the first EOS, padding ignored, on one line: line breaks
        that byte pieces spell (a barely trained model makes them) become spaces, so one
        sentence stays one line of a hypotheses file."""
        ids = [int(i) for i in ids]
        if EOS_ID in ids:
            ids = ids[: ids.index(EOS_ID)]
        return " ".join(self._text([i for i in ids if i != PAD_ID]).splitlines())

    @functools.cached_property
    def fingerprint(self) -> str:
        """sha256 (hex) of `files`' bytes in name order: what identifies the vocabulary."""
        return fingerprint(self.files)

    def _prefix(self, target_lang_token: str) -> list[int]:
        """[the id of `target_lang_token`], [] for ""."""
        if not target_lang_token:
            return []
        return [self._piece(target_lang_token, f"config.data.target_lang_token={target_lang_token!r}")]

    def _piece(self, piece: str, what: str) -> int:
        """The id of `piece`; an error naming `what` and listing the vocabulary's language
        tokens when it is not one piece of it."""
        found = self.piece_id(piece)
        if found is not None:
            return found
        languages = [p for p in self.pieces() if LANGUAGE_TOKEN.fullmatch(p)]
        has = (f"its language tokens are {', '.join(languages[:SHOWN_LANGUAGES])}"
               f"{', ...' if len(languages) > SHOWN_LANGUAGES else ''}" if languages else
               "it has no language tokens (>>xx<<, <2xx>): it is not a multilingual model's")
        raise ValueError(f"{what} is not a piece of the {self.description}; {has}.")


def _processor(path: str, fix: str) -> spm.SentencePieceProcessor:
    """The SentencePiece model at `path` (local or gs://); `fix` says what to do if it is bad."""
    if not files.path(path).is_file():
        raise FileNotFoundError(f"tokenizer model {path!r} does not exist.")
    try:  # from bytes: SentencePiece opens local files only.
        return spm.SentencePieceProcessor(model_proto=files.path(path).read_bytes())
    except RuntimeError as error:
        raise ValueError(f"tokenizer model {path!r} is not a valid SentencePiece model ({error}); "
                         f"{fix}.") from None


class Tokenizer(BaseTokenizer):
    """tfx's joint SentencePiece model; `path` names the file it came from (local or gs://).
    With `target_lang_token`, that piece (a user-defined symbol of the model) starts every source."""

    def __init__(self, path: str, target_lang_token: str = ""):
        self.processor = _processor(
            path, "delete it to retrain, or point config.tokenizer.model_path at a good one")
        self.path = path
        if (self.processor.pad_id(), self.processor.eos_id()) != (PAD_ID, EOS_ID):
            raise ValueError(
                f"tokenizer model {path!r} has pad id {self.processor.pad_id()} and eos id "
                f"{self.processor.eos_id()}; tfx needs pad {PAD_ID} and eos {EOS_ID}."
            )
        self.files = {JOINT_FILE: path}
        self.description = f"SentencePiece model {path}"
        self.source_prefix = self._prefix(target_lang_token)

    @property
    def vocab_size(self) -> int:
        return self.processor.vocab_size()

    def pieces(self) -> list[str]:
        return [self.processor.id_to_piece(i) for i in range(self.vocab_size)]

    def piece_id(self, piece: str) -> int | None:
        found = self.processor.piece_to_id(piece)
        return found if self.processor.id_to_piece(found) == piece else None

    def _source_ids(self, text: str) -> list[int]:
        return self.processor.encode(text)

    _target_ids = _source_ids

    def _many_ids(self, texts: Sequence[str], one: Callable[[str], list[int]]) -> list[list[int]]:
        return self.processor.encode(list(texts), num_threads=os.cpu_count() or 1)

    def _text(self, ids: list[int]) -> str:
        return self.processor.decode(ids)


class MappedTokenizer(BaseTokenizer):
    """An imported model's tokenizer: source text -> the source SentencePiece model's pieces ->
    ids by the vocabulary file; ids -> pieces -> the target model's text. A piece outside its
    side's ids (tfx/data/vocabulary.py) is unknown. A source that starts with a language token
    of the vocabulary and a space (">>deu<< text") keeps it as that one piece, as OPUS-MT's
    scripts and Hugging Face's MarianTokenizer do."""

    def __init__(self, source_path: str, target_path: str, vocabulary_path: str,
                 target_lang_token: str = ""):
        self.source = _processor(source_path, "point config.tokenizer.source_model_path at a good one")
        self.target = _processor(target_path, "point config.tokenizer.target_model_path at a good one")
        self.vocabulary = vocabulary_lib.read(vocabulary_path)
        self._ids = {piece: i for i, piece in enumerate(self.vocabulary.pieces)}
        self._source = self.vocabulary.side(self.vocabulary.source_ids)
        self._target = self.vocabulary.side(self.vocabulary.target_ids)
        self.files = {SOURCE_FILE: source_path, TARGET_FILE: target_path,
                      VOCABULARY_FILE: vocabulary_path}
        self.description = (f"vocabulary {vocabulary_path} (SentencePiece models {source_path} "
                            f"and {target_path})")
        self.source_prefix = self._prefix(target_lang_token)

    @property
    def vocab_size(self) -> int:
        return len(self.vocabulary.pieces)

    def pieces(self) -> list[str]:
        return list(self.vocabulary.pieces)

    def piece_id(self, piece: str) -> int | None:
        return self._ids.get(piece)

    def _source_ids(self, text: str) -> list[int]:
        first, space, rest = text.partition(" ")
        if space and LANGUAGE_TOKEN.fullmatch(first) and first in self._ids:
            return [self._ids[first]] + _side_ids(self.source, self._source, rest)
        return _side_ids(self.source, self._source, text)

    def _target_ids(self, text: str) -> list[int]:
        return _side_ids(self.target, self._target, text)

    def _text(self, ids: list[int]) -> str:
        return self.target.decode_pieces([self.vocabulary.pieces[i] for i in ids])


def _side_ids(model: spm.SentencePieceProcessor, ids: Mapping[str, int], text: str) -> list[int]:
    """The ids of `model`'s pieces of `text` by one side's piece -> id map; UNK_ID if not in it."""
    return [ids.get(piece, UNK_ID) for piece in model.encode(text, out_type=str)]


def train_or_load(sentences: Callable[[], Iterable[str]], content_key: str, cache_dir: str,
                  vocab_size: int, model_type: str = "unigram", character_coverage: float = 1.0,
                  target_lang_token: str = "", symbols: Sequence[str] = ()) -> Tokenizer:
    """Trains a joint vocabulary on `sentences()` (source and target text), with `symbols`
    (language tokens, corpus tags) as pieces of their own, or loads the model cached in
    `cache_dir` under a hash of `content_key` (what identifies the sentences) and the settings.
    The model is written to a temporary name and renamed, so a crash never leaves half a file.
    """
    if model_type not in TOKENIZER_MODEL_TYPES:
        raise choice_error("tokenizer.model_type", model_type, TOKENIZER_MODEL_TYPES)
    settings = dict(vocab_size=vocab_size, model_type=model_type,
                    character_coverage=character_coverage, content=content_key)
    if symbols:  # (a vocabulary without them keeps its cache key)
        settings["symbols"] = list(symbols)
    digest = hashlib.sha256(repr(sorted(settings.items())).encode()).hexdigest()[:16]
    path = os.path.join(cache_dir, f"spm-{model_type}-{vocab_size}-{digest}.model")
    if os.path.exists(path):
        return Tokenizer(path, target_lang_token)
    os.makedirs(cache_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as scratch:
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(sentences()), model_prefix=os.path.join(scratch, "spm"),
                vocab_size=vocab_size, model_type=model_type, character_coverage=character_coverage,
                pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID, bos_id=-1, byte_fallback=True,
                normalization_rule_name="identity", remove_extra_whitespaces=False,
                max_sentence_length=1 << 16, num_threads=os.cpu_count() or 1, minloglevel=2,
                user_defined_symbols=list(symbols))
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
    return Tokenizer(path, target_lang_token)


def sample_sentences(split: corpora.Split, max_sentences: int, temperature: float = 0.0,
                     seed: int = 0) -> Iterable[str]:
    """Source and target text of the pairs of `split`: all of them, or, when max_sentences > 0,
    of max_sentences // 2 pairs drawn from its corpora by their shares of the training mix
    (`corpora.mixing_weights`), each corpus's without repeats while it lasts."""
    rng = random.Random(seed)
    if max_sentences <= 0 or max_sentences >= 2 * len(split):
        chosen = range(len(split))
    else:
        pairs = max(1, max_sentences // 2)
        shares = corpora.mixing_weights(split.corpora, temperature)
        counts = [min(len(c.pairs), round(pairs * share)) for c, share in zip(split.corpora, shares)]
        starts = [0, *split.ends[:-1]]
        chosen = sorted(int(start) + i for start, c, count in zip(starts, split.corpora, counts)
                        for i in rng.sample(range(len(c.pairs)), count))
    for index in chosen:
        pair = split[index]
        yield pair["source"]
        yield pair["target"]


def named(config: ml_collections.ConfigDict) -> BaseTokenizer | None:
    """The tokenizer config.tokenizer names: the mapped one (vocabulary_path and its two
    models) or the joint model_path; None when the joint model is to be trained."""
    settings, token = config.tokenizer, corpora.source_token(config)
    if settings.vocabulary_path:
        return MappedTokenizer(settings.source_model_path, settings.target_model_path,
                               settings.vocabulary_path, token)
    if settings.model_path:
        return Tokenizer(settings.model_path, token)
    return None


def from_directory(config: ml_collections.ConfigDict, directory: str) -> BaseTokenizer | None:
    """The copies of the config's kind of tokenizer that `directory` (a run's workdir) holds
    (rundir.keep_tokenizer wrote them): vocabulary.json, source.spm and target.spm for a mapped
    one, tokenizer.model for the joint one; None when it holds none."""
    copy = lambda name: files.join(directory, name)
    token = corpora.source_token(config)
    if config.tokenizer.vocabulary_path:
        if not files.path(copy(VOCABULARY_FILE)).is_file():
            return None
        return MappedTokenizer(copy(SOURCE_FILE), copy(TARGET_FILE), copy(VOCABULARY_FILE), token)
    return Tokenizer(copy(JOINT_FILE), token) if files.path(copy(JOINT_FILE)).is_file() else None


def from_config(config: ml_collections.ConfigDict, train: corpora.Split) -> BaseTokenizer:
    """The tokenizer config.tokenizer names (`named`), else the joint vocabulary trained on (a
    sample of) the training split, cached under <data_dir>/tfx_tokenizers."""
    given = named(config)
    if given is not None:
        return given
    settings, sample = config.tokenizer, config.tokenizer.input_sentence_size
    temperature = config.data.temperature
    mix = f":temperature={temperature}" if sample and len(train.corpora) > 1 else ""
    return train_or_load(
        lambda: sample_sentences(train, sample, temperature, config.seed),
        content_key=f"{train.fingerprint}:{config.data.source_lang}-{config.data.target_lang}:"
                    f"sample={sample}:seed={config.seed}{mix}",
        cache_dir=os.path.join(default_data_dir(config.data.data_dir), "tfx_tokenizers"),
        vocab_size=config.model.vocab_size, model_type=settings.model_type,
        character_coverage=settings.character_coverage,
        target_lang_token=corpora.source_token(config), symbols=corpora.vocabulary_symbols(config))


def check_vocab_size(tokenizer: BaseTokenizer, config: ml_collections.ConfigDict):
    """Raises ValueError when `tokenizer` does not have config.model.vocab_size pieces."""
    if tokenizer.vocab_size != config.model.vocab_size:
        raise ValueError(f"config.model.vocab_size={config.model.vocab_size} but the "
                         f"{tokenizer.description} has {tokenizer.vocab_size} pieces.")
