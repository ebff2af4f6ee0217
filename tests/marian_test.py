"""A Marian model imported by tfx computes what CTranslate2's Marian converter computes from the
same files: greedy translations token for token, per-token log-probabilities to 1e-4 and beam
search on nearly every sentence, for every variant of tests/marian_models.py; and tfx's own
export of the import reproduces CTranslate2's conversion. Options tfx cannot compute are refused
by name."""
import dataclasses
import os

import ctranslate2
import jax
import numpy as np
import pytest
import yaml
from flax import nnx

from tfx.convert import marian
from tfx.data.tokenizer import EOS_ID
from tfx.export import ctranslate2 as export
from tfx.infer import trained
from tfx.model import decode

import marian_models

NUM_SOURCES = 64
MAX_DECODING_LENGTH = 40  # tokens before EOS, on both sides.


@dataclasses.dataclass
class Pair:
    """One Marian model as tfx imported it and as CTranslate2 converted it."""
    files: marian_models.MarianFiles
    model: trained.TrainedModel
    translator: ctranslate2.Translator
    sources: list[list[str]]  # random source pieces, without EOS.
    workdir: str

    def ids(self, pieces: list[str]) -> list[int]:
        index = {piece: i for i, piece in enumerate(self.model.tokenizer.pieces())}
        return [index[piece] for piece in pieces] + [EOS_ID]

    def pieces(self, ids: list[int]) -> list[str]:
        table = self.model.tokenizer.pieces()
        return [table[i] for i in ids]


@pytest.fixture(scope="module", params=sorted(marian_models.VARIANTS))
def pair(request, tmp_path_factory) -> Pair:
    directory = tmp_path_factory.mktemp(request.param)
    files = marian_models.write_marian_model(str(directory / "marian"), request.param)
    converted = marian_models.ctranslate2_marian(files, str(directory / "ct2"))
    workdir = str(directory / "tfx")
    imported = marian.convert(files.model, files.vocabs, files.source_spm, files.target_spm, workdir)
    config = imported.config.copy_and_resolve_references()
    config.model.dtype = "float32"
    translator = ctranslate2.Translator(converted, device="cpu", compute_type="float32")
    return Pair(files, trained.load(config, workdir), translator,
                marian_models.random_sources(files, NUM_SOURCES, seed=1), workdir)


def tfx_translate(pair: Pair, **options) -> list[list[str]]:
    """tfx's translations (pieces before EOS) of the pair's sources, with config.decode `options`,
    at most MAX_DECODING_LENGTH tokens before EOS, as CTranslate2's (no per-sentence cap)."""
    sources = [pair.ids(pieces) for pieces in pair.sources]
    inputs_BxS = np.zeros((len(sources), max(map(len, sources))), np.int32)
    for row, ids in enumerate(sources):
        inputs_BxS[row, :len(ids)] = ids
    translate = decode.make_translate(pair.model.config, pair.model.graphdef, pair.model.mesh,
                                      pair.model.params_shardings, max_length=MAX_DECODING_LENGTH + 1,
                                      max_len_a=0.0, max_len_b=0, **options)
    rows = np.asarray(translate(pair.model.params, inputs_BxS)).tolist()
    return [pair.pieces(row[:row.index(EOS_ID)] if EOS_ID in row else row) for row in rows]


def ct2_translate(translator: ctranslate2.Translator, sources: list[list[str]], beam_size: int
                  ) -> list[list[str]]:
    results = translator.translate_batch(sources, beam_size=beam_size, length_penalty=0.0,
                                         min_decoding_length=0, max_decoding_length=MAX_DECODING_LENGTH)
    return [result.hypotheses[0] for result in results]


def tfx_token_log_probs(pair: Pair, targets: list[list[str]]) -> list[np.ndarray]:
    """log p of each target token (EOS included) under tfx, teacher forced."""
    rows = {"inputs": [pair.ids(p) for p in pair.sources], "targets": [pair.ids(t) for t in targets]}
    padded = {}
    for name, ids in rows.items():
        padded[name] = np.zeros((len(ids), max(map(len, ids))), np.int32)
        for row, row_ids in enumerate(ids):
            padded[name][row, :len(row_ids)] = row_ids
    model = nnx.merge(pair.model.graphdef, jax.device_get(pair.model.params))
    log_probs_BxTxV = jax.nn.log_softmax(model(padded["inputs"], padded["targets"]))
    chosen_BxT = np.take_along_axis(np.asarray(log_probs_BxTxV), padded["targets"][..., None], -1)[..., 0]
    return [chosen_BxT[row, :len(ids)] for row, ids in enumerate(rows["targets"])]


def ct2_token_log_probs(translator: ctranslate2.Translator, sources, targets) -> list[np.ndarray]:
    return [np.array(result.log_probs) for result in translator.score_batch(sources, targets)]


def test_greedy_translations_are_token_identical(pair):
    expected = ct2_translate(pair.translator, pair.sources, beam_size=1)
    got = tfx_translate(pair, strategy="greedy")
    ended = sum(len(pieces) < MAX_DECODING_LENGTH for pieces in expected)
    assert ended >= 50, f"only {ended} of {len(expected)} translations end before the limit"
    identical = sum(e == g for e, g in zip(expected, got))
    assert identical == len(expected), f"{identical} of {len(expected)} greedy translations are identical"


def test_token_log_probs_match_ctranslate2(pair):
    targets = ct2_translate(pair.translator, pair.sources, beam_size=1)
    expected = ct2_token_log_probs(pair.translator, pair.sources, targets)
    for row, got in enumerate(tfx_token_log_probs(pair, targets)):
        np.testing.assert_allclose(got, expected[row], atol=1e-4, err_msg=f"sentence {row}")


def test_beam_translations_agree(pair):
    """Beam 4 without length penalty; the two searches differ in when they stop (see
    tests/export_test.py), so a few sentences may differ."""
    expected = ct2_translate(pair.translator, pair.sources, beam_size=4)
    got = tfx_translate(pair, strategy="beam", beam_size=4, length_penalty=0.0)
    agree = sum(e == g for e, g in zip(expected, got))
    assert agree >= 0.95 * len(expected), f"{agree} of {len(expected)} beam translations agree"


def test_the_export_of_the_import_reproduces_ctranslate2s_conversion(pair, tmp_path):
    """tfx's CTranslate2 export has tfx's ids (a <pad> piece more, never said), the same
    translations and the same scores as CTranslate2's own conversion of the .npz."""
    output = export.export_ctranslate2(pair.model, str(tmp_path / "export"))
    exported = ctranslate2.Translator(output, device="cpu", compute_type="float32")
    expected = ct2_translate(pair.translator, pair.sources, beam_size=1)
    assert ct2_translate(exported, pair.sources, beam_size=1) == expected
    for got, want in zip(ct2_token_log_probs(exported, pair.sources, expected),
                         ct2_token_log_probs(pair.translator, pair.sources, expected)):
        np.testing.assert_allclose(got, want, atol=1e-4)
    assert sorted(os.listdir(output)) == sorted(["config.json", "model.bin", "shared_vocabulary.json",
                                                 "source.spm", "target.spm", "tfx_config.json"])


def _with_options(files: marian_models.MarianFiles, directory, **changes) -> str:
    """A copy of the model whose special:model.yml has `changes`."""
    arrays = dict(np.load(files.model))
    options = yaml.safe_load(arrays[marian.OPTIONS_KEY].tobytes().rstrip(b"\0"))
    options.update(changes)
    arrays[marian.OPTIONS_KEY] = np.frombuffer(yaml.safe_dump(options).encode() + b"\0", np.int8)
    path = os.path.join(directory, "changed.npz")
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("option, value", [
    ("transformer-decoder-autoreg", "average-attention"),
    ("right-left", True),
    ("transformer-tied-layers", [1, 1]),
    ("transformer-ffn-activation", "leakyrelu"),
    ("transformer-postprocess", "dn"),
    ("factors-dim-emb", 8),
])
def test_options_tfx_cannot_compute_are_refused_by_name(option, value, tmp_path):
    files = marian_models.write_marian_model(str(tmp_path / "marian"), "post_relu_tied")
    changed = _with_options(files, tmp_path, **{option: value})
    with pytest.raises(ValueError, match=f"Marian option .*{option}"):
        marian.convert(changed, files.vocabs, files.source_spm, files.target_spm, str(tmp_path / "tfx"))
    assert not os.path.exists(tmp_path / "tfx")


def test_unknown_parameters_and_bad_vocabularies_are_refused(tmp_path):
    files = marian_models.write_marian_model(str(tmp_path / "marian"), "post_relu_tied")
    arrays = dict(np.load(files.model))
    arrays["decoder_l1_aan_W1"] = np.zeros((4, 4), np.float32)
    extra = str(tmp_path / "extra.npz")
    np.savez(extra, **arrays)
    with pytest.raises(ValueError, match="parameters tfx does not compute: decoder_l1_aan_W1"):
        marian.convert(extra, files.vocabs, files.source_spm, files.target_spm, str(tmp_path / "a"))
    broken = tmp_path / "vocab.yml"
    broken.write_text('"</s>": 0\n"<unk>": 1\n"a": 3\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"vocab.yml: ids are not 0\.\.2; missing \[2\]"):
        marian.convert(files.model, [str(broken)], files.source_spm, files.target_spm, str(tmp_path / "b"))
