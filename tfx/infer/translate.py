"""Translate raw text and score given pairs with a trained run (the library of translate.py).

Text goes through the run's tokenizer: sources by its source side (`encode_source`, with
config.data.target_lang_token first), targets and translations by its target side. Sentences
are sorted by length and batched (per_device_eval_batch_size rows per data-parallel device),
each batch padded to a power-of-two length, and a batch with fewer sentences to the fewest rows
of a power-of-two number per device that hold them, so that only a few shapes compile and a
lone sentence (a server's request) decodes as one row; results come back in input order.
Empty lines translate to empty lines without decoding. Sentences longer than model.max_len
tokens are truncated (keeping EOS) and counted. A forced target prefix per line (`prefixes`)
makes its translations begin with it (tfx/model/decode.py); batches without one decode as before.

Scores: an n-best hypothesis carries the model's log-probability over the GNMT length penalty
(the order beam search ranks by; see tfx/model/decode.py); scoring a pair gives the sum and the
mean of its target tokens' log-probabilities, EOS included (teacher forcing, no smoothing).
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence

import jax
import numpy as np
import tqdm

from tfx.core import parallel
from tfx.data.pipeline import bucket, longest_first, truncate
from tfx.data.tokenizer import EOS_ID
from tfx.model import decode
from tfx.train import steps
from tfx.train.rundir import TrainedModel


@dataclasses.dataclass(frozen=True)
class Hypothesis:
    text: str
    score: float


class NonFiniteScoresError(ValueError):
    """Every hypothesis of a sentence scored NaN or -inf: `index`, its position in the input,
    and `where`, how the message names it."""

    def __init__(self, index: int, where: str, hypotheses: int):
        self.index, self.hypotheses = index, hypotheses
        super().__init__(
            f"{where}: all {hypotheses} "
            f"{'hypothesis' if hypotheses == 1 else 'hypotheses'} scored a non-finite "
            "log-probability (NaN or -inf), so the parameters are probably NaN or infinite (the "
            "checkpoint diverged or is damaged); check the run's training losses and use an "
            "earlier --checkpoint.")


def excerpt(text: str, most: int = 40) -> str:
    """The start of `text` on one line, for an error message."""
    text = " ".join(text.split())
    return text if len(text) <= most else text[:most - 3] + "..."


@dataclasses.dataclass
class Report:
    """What a run over some text did, for stderr."""

    sentences: int = 0
    truncated: int = 0  # sentences (or pairs) cut to model.max_len tokens.
    tokens: int = 0  # generated (translation) or scored (scoring) target tokens, EOS included.
    seconds: float = 0.0

    def __str__(self) -> str:
        rate = 1.0 / max(self.seconds, 1e-9)
        return (f"{self.sentences} sentences in {self.seconds:.1f} s ({self.sentences * rate:.1f} "
                f"sentences/s, {self.tokens * rate:.0f} tokens/s); {self.truncated} truncated")


def _encode(encode: Callable[[str], list[int]], text: str, max_len: int) -> tuple[np.ndarray, bool]:
    """(`encode(text)` cut to `max_len` ids keeping EOS, whether it was cut)."""
    ids = np.asarray(encode(text), np.int32)
    return truncate(ids, max_len), len(ids) > max_len


def _padded(rows: Sequence[np.ndarray], batch: int, max_len: int) -> np.ndarray:
    """[batch, bucket] right-padded int32; rows after len(rows) are all padding."""
    out = np.zeros((batch, bucket(max(len(r) for r in rows), max_len)), np.int32)
    for i, row in enumerate(rows):
        out[i, :len(row)] = row
    return out


class Translator:
    """Translates and scores with a `TrainedModel` as `config.decode` says (single process)."""

    def __init__(self, model: TrainedModel):
        if jax.process_count() > 1:
            raise ValueError("translate.py runs in one process; use eval.py for multi-host decoding.")
        config = model.config
        self.model, self.max_len = model, config.model.max_len
        devices = parallel.data_parallel_size(model.mesh, config.logical_axis_rules)
        self.rows = config.per_device_eval_batch_size * devices
        self.row_buckets = sorted({min(devices << k, self.rows) for k in range(self.rows.bit_length())})
        self.options = decode.Options.from_config(config)
        self._search = decode.make_translate(config, model.graphdef, model.mesh,
                                             model.params_shardings, nbest=True)
        self._score_step = steps.make_score_step(config, model.graphdef, model.mesh,
                                                 model.params_shardings)
        self._rng = jax.random.PRNGKey(config.seed)

    def width(self) -> int:
        """Hypotheses one search gives per sentence."""
        return self.options.beam_size if self.options.strategy == "beam" else 1

    def check_nbest(self, nbest: int):
        """Refuses an n-best the decoding cannot give (sampling draws as many as asked)."""
        most = nbest if self.options.strategy == "sample" else self.width()
        if nbest < 1 or nbest > most:
            raise ValueError(
                f"--nbest {nbest}: {self.options.strategy} decoding gives at most {most} "
                f"{'hypothesis' if most == 1 else 'hypotheses'} per sentence"
                + (f" (config.decode.beam_size={self.options.beam_size})." if self.options.strategy == "beam"
                   else "; use --strategy beam or sample for more than one."))

    def compile_all(self):
        """Compiles the search for every padded batch shape (rows, source length), so that no
        translation waits for a compile (forced prefixes compile on first use)."""
        lengths = sorted({bucket(n, self.max_len) for n in range(1, self.max_len + 1)})
        for rows in self.row_buckets:
            for length in lengths:
                inputs_BxS = np.zeros((rows, length), np.int32)
                inputs_BxS[:, 0] = EOS_ID  # one-token sources: the search stops at once.
                jax.block_until_ready(self._search(self.model.params, inputs_BxS, jax.random.fold_in(self._rng, 0)))

    def _rows_for(self, sentences: int) -> int:
        """The fewest rows of `row_buckets` that hold a batch of `sentences`."""
        return next(rows for rows in self.row_buckets if rows >= sentences)

    def translate(self, lines: Sequence[str], nbest: int = 1, progress: bool = False,
                  stream: int | None = None, prefixes: Sequence[str] | None = None,
                  source_prefix: Sequence[str] | None = None) -> tuple[list[list[Hypothesis]], Report]:
        """Up to `nbest` hypotheses per line, best first (one empty one for an empty line).
        Sampling draws batch b's numbers from config.seed's key folded with b, and first with
        `stream` if given: calls with different streams draw differently. `prefixes`, one per
        line ("": none), force the start of each line's translations. `source_prefix`, pieces
        (a multilingual model's output-language token), starts every source instead of the
        tokenizer's own `source_prefix`.

        Beam search gives its best `nbest` of beam_size finished hypotheses; sampling draws
        `nbest` samples per line; greedy decoding has one. A line none of whose hypotheses
        scored finite (NaN parameters) raises `NonFiniteScoresError`, naming it.
        """
        self.check_nbest(nbest)
        copies = nbest if self.options.strategy == "sample" else 1
        most = self.width() * copies
        report, start = Report(sentences=len(lines)), time.perf_counter()
        sources = {}
        encode = lambda text: self.model.tokenizer.encode_source(text, source_prefix)
        for i, line in enumerate(lines):
            if line.strip():
                sources[i], cut = _encode(encode, line, self.max_len)
                report.truncated += cut
        forced = self._prefixes(prefixes, len(lines), sources)
        found: dict[int, list[Hypothesis]] = {i: [] for i in sources}
        left = dict.fromkeys(sources, copies)  # searches still to come per sentence.
        todo = [i for i in sources for _ in range(copies)]
        batches = longest_first([len(sources[i]) for i in todo], self.rows)
        key = self._rng if stream is None else jax.random.fold_in(self._rng, stream)
        for number, rows in enumerate(tqdm.tqdm(batches, desc="translating", unit="batch",
                                                disable=not progress)):
            indices = [todo[r] for r in rows]
            padded_rows = self._rows_for(len(indices))
            inputs_BxS = _padded([sources[i] for i in indices], padded_rows, self.max_len)
            rng = jax.random.fold_in(key, number)
            prefix_BxP = None
            if any(len(forced.get(i, ())) for i in indices):
                prefix_BxP = _padded([forced.get(i, np.zeros(0, np.int32)) for i in indices], padded_rows,
                                     self.max_len)
            tokens_BxWxT, scores_BxW = jax.device_get(
                self._search(self.model.params, inputs_BxS, rng, prefix_BxP))
            for row, index in enumerate(indices):
                report.tokens += _length(tokens_BxWxT[row, 0])
                found[index] += self._finite(tokens_BxWxT[row], scores_BxW[row])
                left[index] -= 1
            failed = sorted(i for i in set(indices) if not left[i] and not found[i])
            if failed:
                where = f"line {failed[0] + 1} of the input ({excerpt(lines[failed[0]])!r})"
                raise NonFiniteScoresError(failed[0], where, most)
        results = [[Hypothesis("", 0.0)] for _ in lines]
        for i, hypotheses in found.items():
            results[i] = sorted(hypotheses, key=lambda h: -h.score)[:nbest]
        report.seconds = time.perf_counter() - start
        return results, report

    def _prefixes(self, prefixes: Sequence[str] | None, lines: int, sources: dict) -> dict[int, np.ndarray]:
        """The forced prefixes' target ids (no EOS, at most max_len - 1) of the lines to decode."""
        if prefixes is None:
            return {}
        if len(prefixes) != lines:
            raise ValueError(f"{len(prefixes)} prefixes for {lines} lines; give one per line (\"\": none).")
        encode = self.model.tokenizer.encode_target
        return {i: np.asarray(encode(prefixes[i])[:-1][:self.max_len - 1], np.int32)
                for i in sources if prefixes[i].strip()}

    def _finite(self, tokens_WxT: np.ndarray, scores_W: np.ndarray) -> list[Hypothesis]:
        """The hypotheses of one search with a finite score (-inf: the beam has fewer)."""
        return [Hypothesis(self.model.tokenizer.decode(tokens_T), float(score))
                for tokens_T, score in zip(tokens_WxT, scores_W) if np.isfinite(score)]

    def score(self, sources: Sequence[str], targets: Sequence[str], progress: bool = False
              ) -> tuple[list[tuple[float, int]], Report]:
        """(sum of the target tokens' log-probabilities, number of tokens) per pair."""
        if len(sources) != len(targets):
            raise ValueError(f"{len(sources)} sources but {len(targets)} targets; they must be line-aligned.")
        report, start = Report(sentences=len(sources)), time.perf_counter()
        pairs = []
        tokenizer = self.model.tokenizer
        for source, target in zip(sources, targets):
            inputs, cut_source = _encode(tokenizer.encode_source, source, self.max_len)
            outputs, cut_target = _encode(tokenizer.encode_target, target, self.max_len)
            pairs.append((inputs, outputs))
            report.truncated += cut_source or cut_target
        results: list[tuple[float, int]] = [(0.0, 0)] * len(pairs)
        batches = longest_first([max(len(a), len(b)) for a, b in pairs], self.rows)
        for rows in tqdm.tqdm(batches, desc="scoring", unit="batch", disable=not progress):
            batch = {key: _padded([pairs[r][side] for r in rows], self._rows_for(len(rows)), self.max_len)
                     for side, key in enumerate(("inputs", "targets"))}
            log_prob_B, tokens_B = jax.device_get(self._score_step(self.model.params, batch))
            for row, index in enumerate(rows):
                results[index] = (float(log_prob_B[row]), int(tokens_B[row]))
                report.tokens += int(tokens_B[row])
        report.seconds = time.perf_counter() - start
        return results, report


def _length(tokens_T: np.ndarray) -> int:
    """Tokens of a hypothesis, EOS included."""
    ends = np.flatnonzero(tokens_T == EOS_ID)
    return int(ends[0]) + 1 if len(ends) else int(np.sum(tokens_T > 0))
