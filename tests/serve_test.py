"""serve.py with the JAX backend, over HTTP on loopback: its answers equal the Translator's
(translate.py's library), bad requests get their errors, and nothing else is lost."""
import concurrent.futures
import os
import re
import signal
import socket
import time
import urllib.parse

import httpx
import numpy as np
import pytest

from tfx.data.sources import read_lines
from tfx.infer import trained
from tfx.infer.translate import Translator

from runs import ROOT
from servers import Server

TEST_EN = os.path.join(ROOT, "data", "multi30k-en-de", "test_2016_flickr.en")
SENTENCES = list(read_lines(TEST_EN))[:24]


@pytest.fixture(scope="module")
def served(serving, converged):
    """The session's server (conftest.py) and the Translator of the run it serves."""
    config, workdir = converged
    return serving, Translator(trained.load(config, workdir))


@pytest.fixture(scope="module")
def strict(converged):
    """The same run behind small limits: a 2 s batching window and a 0.5 s timeout (so a lone
    sentence times out), 8 sentences in the queue, 1 KB bodies, idle connections closed after 1 s."""
    _, workdir = converged
    with Server([f"--workdir={workdir}", "--max_wait_ms=2000", "--timeout=0.5", "--max_queue=8",
                 "--max_body_kb=1", "--max_sentences=16", "--keep_alive_s=1"]) as server:
        yield server
        server.stop()


def post(server, path, body, **kwargs) -> httpx.Response:
    return httpx.post(server.url + path, timeout=120, **kwargs, **({"json": body} if body is not None else {}))


def metric(server, name: str) -> float:
    """The sum of a metric's samples (all labels) in GET /metrics."""
    text = httpx.get(server.url + "/metrics").text
    return sum(float(value) for value in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def test_libretranslate_api_answers_with_the_translators_translations(served):
    server, translator = served
    expected = [r[0].text for r in translator.translate(SENTENCES[:5])[0]]
    one = post(server, "/translate", {"q": SENTENCES[0], "source": "en", "target": "de"})
    assert one.status_code == 200 and one.json() == {"translatedText": expected[0]}
    many = post(server, "/translate", {"q": SENTENCES[:5], "source": "auto", "target": "de"})
    assert many.json() == {"translatedText": expected}
    alternatives = post(server, "/translate", {"q": SENTENCES[:2], "source": "en", "target": "de", "alternatives": 2})
    nbest, _ = translator.translate(SENTENCES[:2], nbest=3)
    assert alternatives.json() == {"translatedText": expected[:2],
                                   "alternatives": [[h.text for h in hs[1:]] for hs in nbest]}
    form = httpx.post(server.url + "/translate", data={"q": SENTENCES[0], "source": "en", "target": "de"})
    assert form.json() == {"translatedText": expected[0]}  # as Python's requests.post(url, data=...) sends it.
    assert httpx.get(server.url + "/languages").json() == [
        {"code": "en", "name": "en", "targets": ["de"]}, {"code": "de", "name": "de", "targets": []}]
    assert httpx.get(server.url + "/health").json() == {"status": "ok", "backend": "jax", "source": "en",
                                                        "target": "de"}


def test_v1_gives_nbest_scores_prefixes_and_decoding_options_as_the_translator(served, converged):
    server, translator = served
    reply = post(server, "/v1/translate", {"text": SENTENCES[:3], "nbest": 3}).json()["translations"]
    expected, _ = translator.translate(SENTENCES[:3], nbest=3)
    for got, hypotheses in zip(reply, expected):
        assert [h["text"] for h in got["hypotheses"]] == [h.text for h in hypotheses] and got["text"] == hypotheses[0].text
        np.testing.assert_allclose([h["score"] for h in got["hypotheses"]], [h.score for h in hypotheses], rtol=1e-5)
    prefixes = ["Eine Frau", "", "Zwei"]
    forced = post(server, "/v1/translate", {"text": SENTENCES[:3], "prefix": prefixes}).json()["translations"]
    assert [t["text"] for t in forced] == [r[0].text for r in translator.translate(SENTENCES[:3], prefixes=prefixes)[0]]
    assert forced[0]["text"].startswith("Eine Frau") and forced[2]["text"].startswith("Zwei")
    config, workdir = converged
    greedy_config = config.copy_and_resolve_references()
    greedy_config.decode.update(strategy="greedy", max_length=6)
    greedy = Translator(trained.load(greedy_config, workdir))
    reply = post(server, "/v1/translate", {"text": SENTENCES[:4], "strategy": "greedy", "max_length": 6}).json()
    assert [t["text"] for t in reply["translations"]] == [r[0].text for r in greedy.translate(SENTENCES[:4])[0]]


BAD_REQUESTS = [  # (path, raw body, status, error)
    ("/translate", b"{", 400, "body: invalid JSON (Expecting property name enclosed in double quotes at line 1 column 2)."),
    ("/translate", b'{"q": "\xff"}', 400, "body: invalid UTF-8 at byte 7."),
    ("/translate", b'["a"]', 400, "body: expected a JSON object, got a list."),
    ("/translate", b'{"source": "en", "target": "de"}', 400, "q: missing."),
    ("/translate", b'{"q": 3, "target": "de"}', 400, "q: expected a string or a list, got an integer."),
    ("/translate", b'{"q": ["a", null], "target": "de"}', 400, "q[1]: expected a string, got null."),
    ("/translate", b'{"q": "a", "source": "en", "target": "fr"}', 400, "fr is not supported"),
    ("/translate", b'{"q": "a", "source": "fr", "target": "de"}', 400, "fr is not supported"),
    ("/translate", b'{"q": "a", "target": "de", "format": "html"}', 400, 'format: only "text" is supported.'),
    ("/v1/translate", b'{"text": "a", "beam": 4}', 400, "beam: not a field of /v1/translate; expected some of "
     "['beam_size', 'length_penalty', 'max_length', 'nbest', 'prefix', 'strategy', 'target_lang', 'temperature', "
     "'text', 'top_k', 'top_p']."),
    ("/v1/translate", b'{"text": "a", "nbest": 5}', 400, "nbest 5: beam decoding gives at most 4 hypotheses per "
     "sentence (config.decode.beam_size=4)."),
    ("/v1/translate", b'{"text": "a", "top_p": 1.5}', 400, "config.decode.top_p=1.5 must be in (0, 1]."),
    ("/v1/translate", b'{"text": "a", "beam_size": true}', 400, "beam_size: expected an integer, got a boolean."),
    ("/v1/translate", b'{"text": ["a", "b"], "prefix": ["x"]}', 400, "prefix: expected one per text (2, a list), got 1."),
    ("/v1/translate", b'{"text": "a\\nb"}', 400, "text[0]: one sentence per string, without line breaks."),
    ("/v1/translate", b'{"text": ' + str(["a"] * 33).replace("'", '"').encode() + b"}", 400,
     "text: 33 sentences; at most 32 per request."),
]


def test_bad_requests_get_errors_naming_the_field_and_lose_no_other_reply(served):
    server, translator = served
    expected = [r[0].text for r in translator.translate(SENTENCES[:12])[0]]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        good = [pool.submit(post, server, "/translate", {"q": s, "source": "en", "target": "de"}) for s in SENTENCES[:12]]
        bad = [pool.submit(post, server, path, None, content=body) for path, body, _, _ in BAD_REQUESTS]
        assert [f.result().json()["translatedText"] for f in good] == expected
        for future, (path, body, status, error) in zip(bad, BAD_REQUESTS):
            assert (future.result().status_code, future.result().json()) == (status, {"error": error}), body
    assert metric(server, "tfx_request_errors_total") >= len(BAD_REQUESTS)


def test_concurrent_requests_are_decoded_in_shared_batches_without_compiling(served):
    server, translator = served
    compiled = metric(server, "tfx_compilations")
    long_sentence = " ".join(SENTENCES[:6])  # longer than any bucket the other sentences fill.
    batches, sentences = metric(server, "tfx_batch_sentences_count"), metric(server, "tfx_batch_sentences_sum")
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(lambda s: post(server, "/v1/translate", {"text": s}), [*SENTENCES[:15], long_sentence]))
    expected = [r[0].text for r in translator.translate([*SENTENCES[:15], long_sentence])[0]]
    assert [r.json()["translations"][0]["text"] for r in replies] == expected
    new_batches = metric(server, "tfx_batch_sentences_count") - batches
    assert metric(server, "tfx_batch_sentences_sum") - sentences == 16 and new_batches < 16
    assert metric(server, "tfx_compilations") == compiled  # start-up compiled every shape.


def test_a_full_queue_is_503_with_retry_after_and_a_timeout_504(strict):
    body = {"text": SENTENCES[:9]}  # 9 sentences; the queue holds 8.
    full = post(strict, "/v1/translate", body)
    assert full.status_code == 503 and full.headers["retry-after"] == "1"
    assert full.json() == {"error": "the server is busy: 0 sentences are waiting (at most 8). Retry later."}
    late = post(strict, "/v1/translate", {"text": SENTENCES[0]})  # waits 2 s for a batch.
    assert late.status_code == 504 and late.json() == {"error": "the translation took longer than 0.5 s."}
    too_large = post(strict, "/v1/translate", None, content=b'{"text": "' + b"a" * 2000 + b'"}')
    assert too_large.status_code == 413 and too_large.json() == {"error": "body: larger than 1024 bytes."}
    assert metric(strict, "tfx_queue_sentences") == 0  # the timed-out sentence left the queue.


def open_after_idling(server, seconds: float) -> bool:
    """Whether a keep-alive connection that got a reply is still open after idling `seconds`."""
    url = urllib.parse.urlsplit(server.url)
    with socket.create_connection((url.hostname, url.port), timeout=10) as connection:
        connection.sendall(b"GET /health HTTP/1.1\r\nHost: tfx\r\n\r\n")
        reply = b""
        while b"\r\n\r\n" not in reply or not reply.endswith(b"}"):  # headers, then the JSON body.
            chunk = connection.recv(4096)
            assert chunk, f"the server closed the connection before its reply ended: {reply!r}"
            reply += chunk
        assert reply.startswith(b"HTTP/1.1 200")
        time.sleep(seconds)
        connection.settimeout(0.5)
        try:
            return connection.recv(1) != b""  # b"": the server closed it.
        except TimeoutError:
            return True


def test_idle_connections_stay_open_for_keep_alive_s(served, strict):
    assert open_after_idling(served[0], 6)  # the default of 75 s, past uvicorn's own 5 s.
    assert not open_after_idling(strict, 2.5)  # --keep_alive_s=1.


def test_sigterm_answers_the_requests_in_flight_then_exits(converged):
    _, workdir = converged
    with Server([f"--workdir={workdir}", "--max_wait_ms=1500"]) as server:
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            replies = [pool.submit(post, server, "/v1/translate", {"text": s}) for s in SENTENCES[:4]]
            time.sleep(0.5)  # the requests wait in the batching window.
            assert metric(server, "tfx_queue_sentences") == 4
            server.process.send_signal(signal.SIGTERM)
            assert all(r.result().status_code == 200 for r in replies)
        # One SIGTERM, as Kubernetes or systemd send: waited for, not sent again (server.stop).
        assert server.process.wait(120) == 0, "\n".join(server.lines[-30:])
