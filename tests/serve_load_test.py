"""A bounded load on the session's server (conftest.py): 1 to 128 concurrent clients, every
reply translate.py's translation of its sentence, bad requests among them refused alone."""
import asyncio
import os
import re

import httpx
import pytest

from tfx.data.sources import read_lines
from tfx.infer import trained
from tfx.infer.translate import Translator
from tfx.serve.load import run_load

from runs import ROOT

SENTENCES = list(read_lines(os.path.join(ROOT, "data", "multi30k-en-de", "test_2016_flickr.en")))[:64]


@pytest.fixture(scope="module")
def expected(converged):
    config, workdir = converged
    results, _ = Translator(trained.load(config, workdir)).translate(SENTENCES)
    return [hypotheses[0].text for hypotheses in results]


def compilations(server) -> float:
    return float(re.search(r"^tfx_compilations (\S+)$", httpx.get(server.url + "/metrics").text, re.M).group(1))


@pytest.mark.parametrize("clients", [1, 8, 32, 128])
def test_every_client_gets_its_sentences_translation(serving, expected, clients):
    compiled = compilations(serving)
    load = asyncio.run(run_load(serving.url, SENTENCES, clients, requests=max(16, 2 * clients), seconds=120))
    assert len(load.good) == max(16, 2 * clients)
    assert [(status, text) for _, status, text in load.good] == [(200, expected[i]) for i, _, _ in load.good]
    assert compilations(serving) == compiled


def test_bad_requests_within_the_load_get_400_and_the_good_ones_their_translations(serving, expected):
    load = asyncio.run(run_load(serving.url, SENTENCES, 32, requests=200, seconds=120, bad_every=5))
    assert load.bad_statuses == [400] * 40 and len(load.good) == 160
    assert all(status == 200 and text == expected[i] for i, status, text in load.good)
