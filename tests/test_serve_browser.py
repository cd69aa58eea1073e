"""The web page of ``sparsedet serve`` in a real browser (the system's headless Chromium, driven by
Selenium): an uploaded image's list and boxes are the API's detections above the threshold, the
slider re-filters them without a new request, the kept-token overlay shows the chosen layer, a
JPEG turned by its EXIF tag is drawn as the server reads it, and a file that is not an image shows
the server's message. The page must log no console error."""
import base64
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import _skip_or_fail, require_module

require_module("fastapi", "serve")
require_module("selenium", "dev")
for _binary in ("chromium", "chromedriver"):
    if shutil.which(_binary) is None:
        _skip_or_fail(f"{_binary} is not on PATH: the browser test drives the system's Chromium "
                      "(Debian: apt-get install chromium chromium-driver)")

from selenium import webdriver  # noqa: E402
from selenium.common.exceptions import TimeoutException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

from live_server import png, start_server  # noqa: E402
from sparsedet import Detector  # noqa: E402

SMALL = {"hidden_dim": 64, "ffn_dim": 64, "num_decoder_layers": 2, "num_queries": 10, "dn_queries": 4,
         "eval_size": 64, "eval_max_size": 96, "backbone.width": 8}
PREDICTED = 'endpoint="/v1/predict",status="200"'  # the /metrics sample of answered predictions
WAIT_S = 30  # for the page; the model answers a 80x60 image in tens of milliseconds


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """An untrained token-sparse model (Focus-DETR): 30 detections of low scores, and an overlay."""
    run = tmp_path_factory.mktemp("browser") / "run"
    torch.manual_seed(0)
    Detector.from_preset("focus_detr_tiny", num_classes=3, **SMALL).save_pretrained(run)
    live = start_server(run)
    yield live
    assert live.stop() == 0, "".join(live.output)


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,900", "--force-device-scale-factor=1"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # A driver path given: Selenium Manager is skipped, nothing is downloaded.
    driver = webdriver.Chrome(service=Service(executable_path=shutil.which("chromedriver")), options=options)
    yield driver
    driver.quit()


def wait_until(driver, condition, what: str):
    """WebDriverWait, failing with the page's status and console instead of a bare timeout."""
    try:
        return WebDriverWait(driver, WAIT_S).until(condition)
    except TimeoutException:
        status = driver.find_element(By.ID, "status")
        raise AssertionError(f"waited {WAIT_S} s for {what}; status {status.get_attribute('data-state')!r}: "
                             f"{status.text!r}; console: {driver.get_log('browser')}") from None


def open_page(driver, server) -> dict:
    """The page, once it shows the model's facts; /v1/model's answer."""
    facts = server.request("/v1/model").json()
    driver.get(server.url + "/")
    wait_until(driver, lambda d: facts["weights"] in d.find_element(By.ID, "model").text, "the model line")
    return facts


def upload(driver, path, state: str = "done") -> None:
    driver.find_element(By.ID, "file").send_keys(str(path))
    wait_until(driver, lambda d: d.find_element(By.ID, "status").get_attribute("data-state") == state,
               f"status {state!r}")


def drop(driver, path, content_type: str) -> None:
    """Drops the file on the drop zone, as a drag from the desktop ends (WebDriver cannot drag one in)."""
    driver.execute_script("""
        const [name, data, type] = arguments;
        const files = new DataTransfer();
        files.items.add(new File([Uint8Array.from(atob(data), c => c.charCodeAt(0))], name, {type}));
        document.getElementById("drop").dispatchEvent(
            new DragEvent("drop", {dataTransfer: files, bubbles: true, cancelable: true}));
        """, path.name, base64.b64encode(path.read_bytes()).decode(), content_type)


def listed(driver) -> list[dict]:
    """The page's detection list (read in one call, not three per item)."""
    rows = driver.execute_script("return [...document.querySelectorAll('#detections li')]"
                                 ".map(li => [li.dataset.name, li.dataset.score, li.dataset.box])")
    return [{"name": name, "score": float(score), "box": json.loads(box)} for name, score, box in rows]


def assert_shows(driver, detections: list[dict], threshold: float) -> int:
    """The list and the canvas show the API's detections scored above ``threshold``; their count."""
    want = [d for d in detections if d["score"] > threshold]  # as predict keeps them
    got = listed(driver)
    assert [d["name"] for d in got] == [d["name"] for d in want]
    assert [d["score"] for d in got] == pytest.approx([d["score"] for d in want], abs=1e-6)
    assert [v for d in got for v in d["box"]] == pytest.approx([v for d in want for v in d["box"]], abs=1e-3)
    assert driver.find_element(By.ID, "canvas").get_attribute("data-drawn") == str(len(want))
    return len(want)


def console_errors(driver, allowed: tuple[str, ...] = ()) -> list[str]:
    """The console's errors since the last call, but those that contain every part of ``allowed``."""
    return [e["message"] for e in driver.get_log("browser")
            if e["level"] == "SEVERE" and not (allowed and all(a in e["message"] for a in allowed))]


def test_page_shows_the_apis_detections_and_filters_them_without_a_request(server, browser, tmp_path):
    facts = open_page(browser, server)
    wait_until(browser, lambda d: d.find_element(By.ID, "tokens").is_displayed(), "the overlay controls")
    assert float(browser.find_element(By.ID, "threshold-value").text) == pytest.approx(facts["threshold"])
    image = tmp_path / "photo.png"
    image.write_bytes(png(80, 60))
    everything = server.predict(image.read_bytes(), "threshold=0").json()["detections"]
    assert len(everything) == 30 and all(d["score"] > 0 for d in everything)

    upload(browser, image)
    first = assert_shows(browser, everything, facts["threshold"])

    # The keyboard moves the slider, as a user would: the page filters what it has.
    predicted = server.metric("sparsedet_requests_total", PREDICTED)
    slider, shown = browser.find_element(By.ID, "threshold"), browser.find_element(By.ID, "threshold-value")
    slider.send_keys(Keys.HOME)
    wait_until(browser, lambda d: shown.text == "0.00", "the threshold 0.00")
    assert assert_shows(browser, everything, 0.0) == 30 != first
    slider.send_keys(Keys.ARROW_RIGHT, Keys.ARROW_RIGHT)
    wait_until(browser, lambda d: shown.text == "0.02", "the threshold 0.02")
    assert float(slider.get_attribute("value")) == 0.02
    assert 0 < assert_shows(browser, everything, 0.02) < 30
    assert server.metric("sparsedet_requests_total", PREDICTED) == predicted, "the slider asked the server again"

    # The kept tokens: one overlay per encoder layer, laid over the drawn image.
    tokens = server.request("/v1/tokens", image.read_bytes(), "image/png").json()
    browser.find_element(By.ID, "tokens-toggle").click()
    overlay = browser.find_element(By.ID, "tokens-image")

    def showing(layer: int):
        return lambda d: (overlay.is_displayed() and overlay.get_attribute("data-layer") == str(layer)
                          and d.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0",
                                               overlay))

    wait_until(browser, showing(0), "the overlay of layer 0")
    layers = Select(browser.find_element(By.ID, "tokens-layer"))
    of = tokens["valid_tokens"]
    assert [o.text for o in layers.options] == [f"layer {t['layer']}: kept {t['kept']} of {of} tokens"
                                                for t in tokens["layers"]]
    assert overlay.rect == browser.find_element(By.ID, "canvas").rect
    last = len(tokens["layers"]) - 1
    layers.select_by_index(last)
    wait_until(browser, showing(last), f"the overlay of layer {last}")
    assert overlay.get_attribute("src") == tokens["layers"][last]["png"]
    assert browser.find_element(By.ID, "status").get_attribute("data-state") == "done"
    assert console_errors(browser) == []


def test_a_dropped_jpeg_turned_by_exif_is_drawn_as_the_server_reads_it(server, browser, tmp_path):
    open_page(browser, server)
    pixels = np.zeros((60, 80, 3), dtype=np.uint8)
    pixels[:, :40, 0] = pixels[:, 40:, 2] = 255  # stored: red left, blue right
    exif = Image.Exif()
    exif[0x0112] = 6  # a viewer turns it a quarter: red on top
    image = tmp_path / "turned.jpg"
    Image.fromarray(pixels).save(image, exif=exif.tobytes(), quality=95)
    drop(browser, image, "image/jpeg")
    wait_until(browser, lambda d: d.find_element(By.ID, "status").get_attribute("data-state") == "done",
               "the dropped image's detections")
    left, right = browser.execute_script(  # the picture layer, under the boxes' canvas
        "const c = arguments[0], g = c.getContext('2d');"
        "return [0.25, 0.75].map(x => [...g.getImageData(Math.round(x * c.width), Math.round(0.25 * c.height),"
        " 1, 1).data.slice(0, 3)]);", browser.find_element(By.ID, "picture"))
    assert left[0] > 200 > left[2] and right[2] > 200 > right[0], (left, right)
    assert "cannot show" not in browser.find_element(By.ID, "status").text
    assert console_errors(browser) == []


def test_a_file_that_is_not_an_image_shows_the_servers_message(server, browser, tmp_path):
    open_page(browser, server)
    fake = tmp_path / "notes.png"  # the browser types it image/png by its name
    fake.write_text("not an image\n")
    answer = server.predict(fake.read_bytes())
    assert answer.status == 400
    upload(browser, fake, "error")
    assert answer.json()["detail"] in browser.find_element(By.ID, "status").text
    assert browser.find_element(By.ID, "canvas").get_attribute("data-drawn") == "0"
    assert listed(browser) == []
    # The browser reports the refused request itself; anything else is the page's fault.
    assert console_errors(browser, allowed=("/v1/predict", "status of 400")) == []
