"""serve.py's web page in headless Chromium (Debian's chromium and chromium-driver, driven by
Selenium): what it shows equals translate.py's output and POST /v1/translate's reply."""
import decimal
import os
import subprocess
import sys

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from runs import ROOT

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
SENTENCE = "A man is riding a bike."
TWO = ["A man is riding a bike.", "Two dogs play in the snow."]
MOST_SENTENCES = 32  # the server's --max_sentences.


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium; the system's binaries, so Selenium Manager never runs (a Service path
    skips it, SE_OFFLINE forbids it downloading anything)."""
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not os.access(path, os.X_OK)]
    if missing:
        pytest.fail(f"{' and '.join(missing)} missing: install the system packages chromium and "
                    "chromium-driver (apt-get install chromium chromium-driver).", pytrace=False)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
        options.add_argument(argument)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SE_OFFLINE", "true")
        driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def server(serving):
    """The session's server (conftest.py): at most MOST_SENTENCES sentences per request."""
    return serving


def translate_on_page(driver, url: str, text: str, nbest: int = 1) -> tuple[str, str]:
    """Loads the page, types `text` and `nbest`, clicks Translate and waits for the answer:
    (the translation box, the error line)."""
    driver.get(url)
    driver.find_element(By.ID, "source").send_keys(text)
    nbest_box = driver.find_element(By.ID, "nbest")
    nbest_box.clear()
    nbest_box.send_keys(str(nbest))
    driver.find_element(By.ID, "translate").click()
    target, error, button = (driver.find_element(By.ID, name) for name in ("target", "error", "translate"))
    WebDriverWait(driver, 60).until(lambda _: button.is_enabled() and (target.get_property("value") or error.text))
    return target.get_property("value"), error.text


def test_the_page_translates_as_translate_py(browser, server, converged):
    _, workdir = converged
    shown, error = translate_on_page(browser, server.url, SENTENCE)
    done = subprocess.run([sys.executable, os.path.join(ROOT, "translate.py"), f"--workdir={workdir}"],
                          input=SENTENCE + "\n", capture_output=True, text=True,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert error == "" and shown == done.stdout.rstrip("\n") != ""
    assert browser.find_element(By.ID, "status").text == "done"


def shown_score(score: float) -> str:
    """`score` as JavaScript's toFixed(4) writes it: the float's exact value, ties away from 0."""
    return str(decimal.Decimal(score).quantize(decimal.Decimal("0.0001"), decimal.ROUND_HALF_UP))


def test_nbest_table_shows_the_apis_hypotheses_and_scores(browser, server):
    shown, _ = translate_on_page(browser, server.url, "\n".join(TWO), nbest=3)
    reply = httpx.post(server.url + "/v1/translate", json={"text": TWO, "nbest": 3}, timeout=60)
    translations = reply.raise_for_status().json()["translations"]
    assert [len(t["hypotheses"]) for t in translations] == [3, 3]
    assert shown == "\n".join(t["text"] for t in translations)
    rows = browser.execute_script(
        "return [...document.querySelectorAll('#hypotheses tbody tr')].map("
        "(row) => [...row.cells].map((cell) => cell.textContent));")
    assert rows == [[sentence if rank == 0 else "", str(rank + 1), shown_score(h["score"]), h["text"]]
                    for sentence, t in zip(TWO, translations) for rank, h in enumerate(t["hypotheses"])]
    assert browser.find_element(By.ID, "hypotheses").is_displayed()


@pytest.mark.parametrize("text, nbest", [("\n".join(["A dog."] * (MOST_SENTENCES + 1)), 1), (SENTENCE, 5)],
                         ids=["too many sentences", "nbest above the beam"])
def test_the_page_shows_the_servers_error_and_translates_afterwards(browser, server, text, nbest):
    sentences = text.split("\n")
    refused = httpx.post(server.url + "/v1/translate", json={"text": sentences, "nbest": nbest}, timeout=60)
    assert refused.status_code == 400
    shown, error = translate_on_page(browser, server.url, text, nbest)
    assert (shown, error) == ("", refused.json()["error"])
    assert browser.find_element(By.ID, "status").text == ""
    shown, error = translate_on_page(browser, server.url, SENTENCE)
    assert error == "" and shown
