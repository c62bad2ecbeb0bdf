"""The playground page at `/`, in a real headless Chromium against a real `lorafit serve` subprocess: both selects
list the base and the adapter, Send streams into two panes at once, each pane ends with the text the API gives for
the same request at temperature 0, and an error body shows in its pane.

Skipped when Chromium or its driver is missing (scripts/test.sh installs both where it can). Set LORAFIT_SCREENSHOT
to a .png path to keep a screenshot of the finished page.
"""

import json
import os
import shutil
import urllib.request

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from tests.conftest import TINY_WORDS, tiny_generator_adapter
from tests.serve.conftest import serving

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="needs chromium and chromedriver on PATH "
                                "(apt-get install chromium chromium-driver)")

TEMPLATE = ("{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
            "{% if add_generation_prompt %}assistant {% endif %}")
PROMPT, MAX_TOKENS = "hello cat dog", 12


def chat_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer with a word for each of tiny_llama's 128 ids (so every token it picks shows as text)
    and a chat template."""
    words = ["<pad>", "<eos>", "<unk>", "user", "assistant", *TINY_WORDS]
    words += [f"w{i}" for i in range(128 - len(words))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>", pad_token="<pad>",
                                   chat_template=TEMPLATE)


def api(url: str, body: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as res:
        return json.load(res)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`lorafit serve` on a tiny saved Llama with one adapter, named "tiny": its base URL."""
    tmp = tmp_path_factory.mktemp("playground")
    adapter = tiny_generator_adapter(tmp)
    chat_tokenizer().save_pretrained(tmp / "model")  # replaces the folder's tokenizer
    # fp32: the page's two requests, batched together, and the test's lone ones pick the same greedy tokens
    args = [tmp / "model", "--adapter", f"tiny={adapter}", "--threads", "1", "--dtype", "fp32"]
    with serving(args, tmp / "serve.log") as running:
        yield running.url


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,720"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)  # a driver path: no Selenium Manager
    yield driver
    driver.quit()


def pane(browser, side: str) -> tuple[str, str, str]:
    """(state, text, stats) of one pane; the text exactly as streamed in (textContent keeps every space)."""
    return (browser.find_element(By.ID, f"pane-{side}").get_attribute("data-state"),
            browser.execute_script(f"return document.getElementById('out-{side}').textContent"),
            browser.find_element(By.ID, f"stats-{side}").text)


def send(browser, sides: tuple[str, ...]) -> None:
    browser.find_element(By.ID, "send").click()
    WebDriverWait(browser, 30).until(
        lambda b: all(pane(b, s)[0] not in ("idle", "streaming") for s in sides)
        and b.find_element(By.ID, "send").is_enabled())


def test_two_panes_stream_what_the_api_answers(server, browser):
    listed = api(server + "/v1/models")["data"]
    ids = [m["id"] for m in listed]
    base = next(m["id"] for m in listed if not m.get("parent"))
    assert "tiny" in ids

    browser.get(server + "/")
    left, right = (Select(browser.find_element(By.ID, f"model-{side}")) for side in ("left", "right"))
    WebDriverWait(browser, 10).until(lambda _: len(right.options) == len(ids) + 1)
    assert [o.get_attribute("value") for o in left.options] == ids
    assert [o.get_attribute("value") for o in right.options] == ["", *ids]  # "": none, a single pane
    left.select_by_value(base)
    right.select_by_value("tiny")
    for field, value in (("max-tokens", MAX_TOKENS), ("temperature", 0), ("prompt", PROMPT)):
        browser.find_element(By.ID, field).clear()
        browser.find_element(By.ID, field).send_keys(str(value))
    send(browser, ("left", "right"))

    for side, model in (("left", base), ("right", "tiny")):
        state, text, stats = pane(browser, side)
        assert state == "done", text
        expected = api(server + "/v1/chat/completions", {
            "model": model, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": MAX_TOKENS,
            "temperature": 0})["choices"][0]
        assert expected["message"]["content"], "the tiny model answered nothing: the comparison would be empty"
        assert text == expected["message"]["content"]
        assert "first token" in stats and f"finish: {expected['finish_reason']}" in stats
    if os.environ.get("LORAFIT_SCREENSHOT"):
        browser.save_screenshot(os.environ["LORAFIT_SCREENSHOT"])

    # An unknown model: the server's OpenAI error body shows in the pane; "none" on the right leaves one pane.
    browser.execute_script("const s = document.getElementById('model-left');"
                           "s.add(new Option('no-such-model', 'no-such-model')); s.value = 'no-such-model';")
    right.select_by_value("")
    assert not browser.find_element(By.ID, "pane-right").is_displayed()
    send(browser, ("left",))
    state, text, _ = pane(browser, "left")
    assert state == "error" and "no-such-model" in text and "HTTP 4" in text, text
