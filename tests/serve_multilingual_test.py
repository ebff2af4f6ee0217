"""Serving a multilingual model: each request chooses its output language, and gets what
translate.py --target_lang gives; the language list and the errors are LibreTranslate's.
The app runs in this process (Starlette's TestClient), over the tiny en<->de model."""
import concurrent.futures
import os

import pytest
from starlette.testclient import TestClient

from tfx.core import config as config_lib
from tfx.data.corpora import language_token
from tfx.data.sources import read_lines
from tfx.infer import trained
from tfx.infer.translate import Translator
from tfx.serve.app import Settings, create_app
from tfx.serve.jax_backend import JaxBackend
from tfx.serve.languages import Languages

from runs import MULTI30K, MULTILINGUAL_TEST, ROOT

SENTENCES = {lang: list(read_lines(f"{MULTILINGUAL_TEST}.{lang}"))[:6] for lang in ("en", "de")}


@pytest.fixture(scope="module")
def run(multilingual):
    """(config, workdir) of the multilingual run, outputs capped at 24 tokens whatever the batch
    (the cap otherwise follows a batch's longest source, and the tiny model's outputs can
    run to it), so that the server's batching changes no translation."""
    config, workdir = multilingual
    config = config.copy_and_resolve_references()
    config.decode.update(max_length_offset=config.model.max_len, max_length=24)
    return config, workdir


@pytest.fixture(scope="module")
def client(run):
    config, workdir = run
    with TestClient(create_app(JaxBackend(config, workdir, "latest"), Settings(max_wait=0.05))) as client:
        yield client


def translate_py(run, target_lang: str, sentences: list[str]) -> list[str]:
    """translate.py --target_lang's translations (its config change, then the Translator)."""
    config, workdir = run
    config = config.copy_and_resolve_references()
    config.data.target_lang_token = language_token(target_lang, config.data.target_lang_token)
    return [h[0].text for h in Translator(trained.load(config, workdir)).translate(sentences)[0]]


def test_each_request_gets_the_language_it_asks_for(client, run):
    expected = {(source, target): translate_py(run, target, SENTENCES[source])
                for source in ("en", "de") for target in ("en", "de")}
    assert expected["en", "de"] != expected["en", "en"]  # the token matters.
    requests = [("/translate", {"q": SENTENCES["en"], "source": "en", "target": "de"}, ("en", "de")),
                ("/translate", {"q": SENTENCES["de"], "source": "de", "target": "en"}, ("de", "en")),
                ("/translate", {"q": SENTENCES["en"], "source": "auto", "target": "en"}, ("en", "en")),
                ("/v1/translate", {"text": SENTENCES["de"], "target_lang": "de"}, ("de", "de")),
                ("/v1/translate", {"text": SENTENCES["en"]}, ("en", "de"))]  # the config's own.
    with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:  # batched together, by language.
        replies = list(pool.map(lambda r: client.post(r[0], json=r[1]).json(), requests))
    for (_, _, pair), reply in zip(requests, replies):
        texts = reply.get("translatedText") or [t["text"] for t in reply["translations"]]
        assert texts == expected[pair], pair


def test_the_languages_and_errors_are_libretranslates(client):
    assert client.get("/languages").json() == [{"code": "en", "name": "en", "targets": ["de"]},
                                               {"code": "de", "name": "de", "targets": ["en"]}]
    assert client.get("/health").json()["target"] == "de"
    for body, error in [({"source": "fr", "target": "de"}, "fr is not supported"),
                        ({"source": "en", "target": "en"}, "en is not supported"),
                        ({"source": "auto", "target": "fr"}, "fr is not supported")]:
        reply = client.post("/translate", json={"q": "A dog.", **body})
        assert (reply.status_code, reply.json()) == (400, {"error": error})
    reply = client.post("/v1/translate", json={"text": "A dog.", "target_lang": "fr"})
    assert reply.status_code == 400 and reply.json()["error"].startswith("target_lang: expected one of ['de', 'en']")


def test_languages_of_one_pair_many_pairs_and_a_fixed_token():
    one = Languages.of(config_lib.load(MULTI30K))
    assert (one.pairs, one.multilingual, one.source_pieces(None)) == ((("en", "de"),), False, [])
    both = Languages.of(config_lib.load(f"{MULTI30K}:multilingual"))
    assert both.pairs == (("en", "de"), ("de", "en")) and both.multilingual
    assert (both.source_pieces("en"), both.source_pieces(None), both.targets("de")) == (["<2en>"], ["<2de>"], ["en"])
    tagged = Languages.of(config_lib.load(f"{MULTI30K}:bt"))  # two corpora, one pair: not multilingual.
    assert tagged.pairs == (("en", "de"),) and not tagged.multilingual
    opus = config_lib.load(os.path.join(ROOT, "configs", "multi30k.py"))
    opus.data.target_lang_token = ">>deu<<"  # an OPUS-MT model's fixed output language.
    assert Languages.of(opus).source_pieces("de") == [">>deu<<"]
