"""The tiny Marian models of marian_models.py: Marian's file format, as CTranslate2 reads it."""
import ctranslate2
import numpy as np
import pytest
import yaml
from ctranslate2.converters import marian as ct2_marian

import marian_models


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """variant -> MarianFiles, written with seed 0."""
    return {variant: marian_models.write_marian_model(str(tmp_path_factory.mktemp(variant)), variant)
            for variant in marian_models.VARIANTS}


def expected_names(options: dict) -> set[str]:
    """Marian's parameter names for `options`, written out by hand from src/models/transformer.h."""
    norm = "_pre" if options["transformer-preprocess"] == "n" else ""
    names = {"special:model.yml", "decoder_ff_logit_out_b"}
    if options["tied-embeddings-all"]:
        names.add("Wemb")
    else:
        names |= {"encoder_Wemb", "decoder_Wemb"}
    if not (options["tied-embeddings-all"] or options["tied-embeddings"]):
        names.add("decoder_ff_logit_out_W")
    if options["transformer-train-position-embeddings"]:
        names.add("Wpos")
    for stack in ("encoder", "decoder"):
        if options["transformer-postprocess-emb"] == "nd":
            names |= {f"{stack}_emb_ln_scale_pre", f"{stack}_emb_ln_bias_pre"}
        if options["transformer-postprocess-top"] == "n":
            names |= {f"{stack}_top_ln_scale", f"{stack}_top_ln_bias"}
        blocks = ["self", "context"] if stack == "decoder" else ["self"]
        for i in (1, 2):
            for block in blocks:
                prefix = f"{stack}_l{i}_{block}"
                names |= {f"{prefix}_{w}{x}" for w in "Wb" for x in "qkvo"}
                names |= {f"{prefix}_Wo_ln_scale{norm}", f"{prefix}_Wo_ln_bias{norm}"}
            prefix = f"{stack}_l{i}_ffn"
            names |= {f"{prefix}_{w}" for w in ("W1", "b1", "W2", "b2")}
            names |= {f"{prefix}_ffn_ln_scale{norm}", f"{prefix}_ffn_ln_bias{norm}"}
    return names


def test_post_norm_layers_have_the_16_and_26_parameters_of_opus_mt(models):
    names = set(np.load(models["post_relu_tied"].model).files)
    assert len({n for n in names if n.startswith("encoder_l1_")}) == 16
    assert len({n for n in names if n.startswith("decoder_l1_")}) == 26
    assert names == expected_names(models["post_relu_tied"].options)


@pytest.mark.parametrize("variant", marian_models.VARIANTS)
def test_ctranslate2_reads_every_parameter_and_nothing_else(models, variant, monkeypatch, tmp_path):
    files = models[variant]
    with np.load(files.model) as npz:
        names = set(npz.files)
        arrays = {name: npz[name] for name in names}
    assert names == expected_names(files.options)
    read = set()

    class Recording(dict):
        def __getitem__(self, name):
            value = super().__getitem__(name)  # a KeyError (a `_pre` norm tried first) reads nothing
            read.add(name)
            return value

        def get(self, name, default=None):
            if name in self:
                read.add(name)
            return super().get(name, default)

    real_load = np.load
    monkeypatch.setattr(ct2_marian.np, "load", lambda path: Recording(real_load(path)))
    marian_models.ctranslate2_marian(files, str(tmp_path / "ct2"))
    assert read == names

    v_src, v_trg = files.options["dim-vocabs"]
    d, f = marian_models.DIM, marian_models.FFN
    assert all(a.dtype == np.float32 for n, a in arrays.items() if n != "special:model.yml")
    assert arrays["decoder_ff_logit_out_b"].shape == (1, v_trg)
    assert arrays["encoder_l1_ffn_W1"].shape == (d, f) and arrays["decoder_l2_ffn_W2"].shape == (f, d)
    assert arrays["decoder_l2_context_bq"].shape == (1, d)
    embedding = "Wemb" if "Wemb" in names else "decoder_Wemb"
    assert arrays[embedding].shape == (v_trg, d)
    if "encoder_Wemb" in names:
        assert arrays["encoder_Wemb"].shape == (v_src, d)
    if "decoder_ff_logit_out_W" in names:
        assert arrays["decoder_ff_logit_out_W"].shape == (d, v_trg)
    if "Wpos" in names:
        assert arrays["Wpos"].shape == (files.options["max-length"], d)


@pytest.mark.parametrize("variant", marian_models.VARIANTS)
def test_special_model_yml_is_the_options_as_nul_terminated_bytes(models, variant):
    files = models[variant]
    raw = np.load(files.model)["special:model.yml"]
    assert raw.ndim == 1 and raw.dtype == np.int8 and raw[-1] == 0
    options = yaml.safe_load(raw[:-1].tobytes())
    assert options == files.options
    assert options.items() >= marian_models.VARIANTS[variant].items()
    assert options["dim-vocabs"] == [len(ct2_marian.load_vocab(files.vocabs[0])),
                                     len(ct2_marian.load_vocab(files.vocabs[-1]))]


@pytest.mark.parametrize("variant", marian_models.VARIANTS)
def test_vocabularies_read_the_same_by_ctranslate2_and_by_yaml(models, variant):
    files = models[variant]
    spm_pieces = set()
    for path in (files.source_spm, files.target_spm):
        spm_pieces |= set(marian_models._spm_pieces(path))
    written = []
    for path in files.vocabs:
        pieces = ct2_marian.load_vocab(path)
        assert pieces == marian_models.read_vocab(path)
        assert pieces[:2] == ["</s>", "<unk>"] and len(set(pieces)) == len(pieces)
        written += pieces
    specials = {"</s>", "<unk>", *marian_models.LANGUAGE_TOKENS}
    assert set(written) - specials <= spm_pieces
    assert spm_pieces - set(written), "some SentencePiece pieces must map to <unk>"
    assert (set(marian_models.LANGUAGE_TOKENS) <= set(written)) == (len(files.vocabs) == 1)
    with open(files.vocabs[0], encoding="utf-8") as f:
        text = f.read()
    assert '"\\"": ' in text, "the piece '\"' is written quoted and escaped"
    assert '",": ' in text


def test_ctranslate2_spec_has_marians_positions_and_epsilon(models):
    spec = marian_models.ctranslate2_converter(models["post_relu_tied"])._load()
    assert spec.config.layer_norm_epsilon == 1e-6
    np.testing.assert_array_equal(spec.encoder.position_encodings.encodings,
                                  marian_models.marian_sinusoids(512, 32))
    assert spec.decoder.scale_embeddings
    files = models["post_swish_two_vocabs_wpos"]
    spec = marian_models.ctranslate2_converter(files)._load()
    np.testing.assert_array_equal(spec.decoder.position_encodings.encodings,
                                  np.load(files.model)["Wpos"])
    assert not spec.encoder.scale_embeddings and not spec.decoder.scale_embeddings


def test_marian_sinusoids_by_hand():
    table = marian_models.marian_sinusoids(30, 32)
    np.testing.assert_array_equal(table[0], [0.0] * 16 + [1.0] * 16)
    p = np.arange(30)
    np.testing.assert_allclose(table[:, 0], np.sin(p), atol=1e-6)       # timescale 1
    np.testing.assert_allclose(table[:, 15], np.sin(p * 1e-4), atol=1e-6)  # timescale 1/10000
    np.testing.assert_allclose(table[:, 16 + 5], np.cos(p * 10000 ** (-5 / 15)), atol=1e-6)
    assert not np.allclose(table, ct2_marian._make_sinusoidal_position_encodings(32, 30), atol=1e-3)


@pytest.mark.parametrize("variant", marian_models.VARIANTS)
def test_greedy_translations_of_random_sources_end(models, variant, tmp_path):
    files = models[variant]
    translator = ctranslate2.Translator(marian_models.ctranslate2_marian(files, str(tmp_path)),
                                        device="cpu", intra_threads=1)
    sources = marian_models.random_sources(files, 50, seed=1)
    assert all(1 <= len(s) <= 12 for s in sources)
    results = translator.translate_batch(sources, beam_size=1, max_decoding_length=40)
    lengths = np.array([len(r.hypotheses[0]) for r in results])
    assert np.mean(lengths < 40) >= 0.9
    assert np.median(lengths) >= 5
    assert len({tuple(r.hypotheses[0]) for r in results}) > 1, "translations depend on the source"
