"""serve.py --backend ctranslate2 serves a CTranslate2 export without JAX (a stand-in `jax`
package that refuses to import is first on the server's path): its answers equal CTranslate2
and SentencePiece called directly on the export, and what it cannot do is refused."""
import os

import ctranslate2
import httpx
import pytest
import sentencepiece as spm

from tfx.core import config as config_lib
from tfx.data.sources import read_lines
from tfx.export import ctranslate2 as export
from tfx.infer import trained

from runs import ROOT
from servers import Server

DATA = os.path.join(ROOT, "data", "multi30k-en-de")
SENTENCES = list(read_lines(os.path.join(DATA, "test_2016_flickr.en")))[:8]
REFERENCES = list(read_lines(os.path.join(DATA, "test_2016_flickr.de")))[:8]
NO_JAX = 'raise ImportError("jax must not be imported by the ctranslate2 backend")\n'


@pytest.fixture(scope="module")
def exported(converged, tmp_path_factory):
    """(the converged tiny run's config, its float32 export)."""
    config, workdir = converged
    model = trained.load(config, workdir)
    return model.config, export.export_ctranslate2(model, str(tmp_path_factory.mktemp("ct2") / "model"))


@pytest.fixture(scope="module")
def server(exported, tmp_path_factory):
    stub = tmp_path_factory.mktemp("no_jax")
    (stub / "jax").mkdir()
    (stub / "jax" / "__init__.py").write_text(NO_JAX)
    path = os.pathsep.join(filter(None, [str(stub), os.environ.get("PYTHONPATH")]))
    with Server(["--backend=ctranslate2", f"--model={exported[1]}"], env={"PYTHONPATH": path}) as running:
        yield running
        assert running.stop() == 0


@pytest.fixture(scope="module")
def direct(exported):
    """translate(sentences, prefixes=None, **options) -> each sentence's [(text, score)], from
    CTranslate2 and SentencePiece called as the export's docstring shows, decoding as tfx does:
    EOS allowed from the first step, outputs cut one token before tfx's limit."""
    config, output = exported
    translator = ctranslate2.Translator(output, device="cpu", compute_type="float32")
    sp = spm.SentencePieceProcessor(model_file=os.path.join(output, "sentencepiece.model"))

    def translate(sentences, prefixes=None, **options):
        sources = [sp.encode(text, out_type=str) for text in sentences]
        limit = min(max(map(len, sources)) + 1 + config.decode.max_length_offset, config.model.max_len) - 1
        target_prefix = None if prefixes is None else [sp.encode(text, out_type=str) for text in prefixes]
        results = translator.translate_batch(sources, target_prefix, return_scores=True, min_decoding_length=0,
                                             max_decoding_length=limit, **options)
        return [[(sp.decode(h), score) for h, score in zip(r.hypotheses, r.scores)] for r in results]

    return translate


def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=60)


def test_the_export_holds_the_runs_config(exported):
    config, output = exported
    with open(os.path.join(output, "tfx_config.json"), encoding="utf-8") as f:
        assert config_lib.from_json(f.read(), "tfx_config.json").to_json() == config.to_json()
    assert config.decode.strategy == "beam" and not config.data.target_lang_token


def test_libretranslate_answers_with_ctranslate2_beam_search(server, exported, direct):
    config, _ = exported
    expected = direct(SENTENCES, beam_size=config.decode.beam_size, length_penalty=config.decode.length_penalty)
    reply = post(server, "/translate", {"q": SENTENCES, "source": "en", "target": "de"})
    assert reply.status_code == 200, reply.text
    assert reply.json() == {"translatedText": [hypotheses[0][0] for hypotheses in expected]}
    assert httpx.get(server.url + "/health").json()["backend"] == "ctranslate2"


def test_nbest_texts_and_scores_are_ctranslate2s(server, exported, direct):
    config, _ = exported
    expected = direct(SENTENCES[:4], beam_size=3, num_hypotheses=3, length_penalty=config.decode.length_penalty)
    reply = post(server, "/v1/translate", {"text": SENTENCES[:4], "nbest": 3, "strategy": "beam", "beam_size": 3})
    assert reply.status_code == 200, reply.text
    for translation, hypotheses in zip(reply.json()["translations"], expected, strict=True):
        got = translation["hypotheses"]
        assert [h["text"] for h in got] == [text for text, _ in hypotheses]
        assert [h["score"] for h in got] == pytest.approx([score for _, score in hypotheses], abs=1e-4)
        assert translation["score"] == got[0]["score"] and len(set(h["text"] for h in got)) == 3


def test_a_forced_prefix_is_ctranslate2s_target_prefix(server, exported, direct):
    """The first three words of the reference forced on half the sentences; the others, and an
    empty one, decode unforced in the same request."""
    config, _ = exported
    sentences = SENTENCES[:4] + [""]
    prefixes = [" ".join(ref.split()[:3]) if i % 2 == 0 else "" for i, ref in enumerate(REFERENCES[:4])] + [""]
    options = dict(beam_size=config.decode.beam_size, length_penalty=config.decode.length_penalty)
    forced = [h[0][0] for h in direct(sentences[:4], prefixes[:4], **options)]
    unforced = [h[0][0] for h in direct(sentences[:4], **options)]
    reply = post(server, "/v1/translate", {"text": sentences, "prefix": prefixes})
    assert reply.status_code == 200, reply.text
    got = [translation["text"] for translation in reply.json()["translations"]]
    assert got == forced + [""]
    assert all(text.startswith(prefix) for text, prefix in zip(got, prefixes))
    assert any(f != u for f, u in zip(forced[::2], unforced[::2])), "the prefixes should change a translation"
    assert reply.json()["translations"][4] == {"text": "", "score": 0.0, "hypotheses": [{"text": "", "score": 0.0}]}


def test_what_it_cannot_do_is_refused_naming_the_field(server, exported):
    config, _ = exported
    french = post(server, "/translate", {"q": SENTENCES[0], "source": "en", "target": "fr"})
    assert (french.status_code, french.json()) == (400, {"error": "fr is not supported"})
    nbest = post(server, "/v1/translate", {"text": SENTENCES[0], "nbest": config.decode.beam_size + 1})
    assert nbest.status_code == 400 and nbest.json()["error"].startswith("nbest"), nbest.text
    greedy = post(server, "/v1/translate", {"text": SENTENCES[0], "nbest": 2, "strategy": "greedy"})
    assert greedy.status_code == 400 and greedy.json()["error"].startswith("nbest"), greedy.text
    top_p = post(server, "/v1/translate", {"text": SENTENCES[0], "strategy": "sample", "top_p": 1.5})
    assert top_p.status_code == 400 and "config.decode.top_p" in top_p.json()["error"], top_p.text


def test_sampling_gives_nbest_samples_best_first(server):
    reply = post(server, "/v1/translate", {"text": SENTENCES[:2], "nbest": 3, "strategy": "sample", "top_k": 0,
                                           "temperature": 2.0})
    assert reply.status_code == 200, reply.text
    for translation in reply.json()["translations"]:
        scores = [h["score"] for h in translation["hypotheses"]]
        assert len(scores) == 3 and scores == sorted(scores, reverse=True)
