"""``cifarlab serve``'s page in a real browser: headless Chromium driven by selenium through Debian's chromedriver.

The test starts the server (tests/test_serve_server.py's helper), uploads an image through the page's file input
as a person would, waits for the bars and reads them, checks them against ``cifarlab predict``, then uploads a
file that is not an image and reads the error. A screenshot of the page is written into the test's tmp dir.
CI installs chromium and chromium-driver (.ci/deps/chromium.sh); under CI=true a skip is a failure.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import cifarlab
from cifarlab.export import run_test_images

from .browser import headless_chromium
from .test_serve_server import Server


@pytest.fixture
def browser(tmp_path):
    with headless_chromium(tmp_path / "chromium-profile", window=(900, 900)) as driver:
        yield driver


def test_page_uploads_an_image_and_shows_the_top_classes(trained_run, tmp_path, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    image = run_test_images(trained_run, limit=3).permute(0, 2, 3, 1).numpy()[2]
    path = tmp_path / "bird.png"
    Image.fromarray(image).resize((128, 128), Image.Resampling.NEAREST).save(path)  # any size: the server resizes
    not_image = tmp_path / "notes.png"
    not_image.write_text("a text file with an image's name\n")
    want = cifarlab.load(trained_run, device="cpu").predict(str(path), top_k=5)

    server = Server(trained_run)
    try:
        browser.get(server.url + "/")
        wait = WebDriverWait(browser, 120)
        wait.until(lambda d: "cnn" in d.find_element(By.ID, "model").text)  # the page read /metadata

        browser.find_element(By.ID, "file").send_keys(str(path))
        wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") in ("done", "error"))
        assert browser.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "done", \
            browser.find_element(By.ID, "status").text
        rows = browser.find_elements(By.CSS_SELECTOR, "#results .result .row")
        labels = [r.get_attribute("data-label") for r in rows]
        probs = [float(r.get_attribute("data-prob")) for r in rows]
        assert labels == want.labels
        np.testing.assert_allclose(probs, want.probs, atol=1e-5)
        # The bars are drawn: the first one is as wide as its probability, the text says it in percent.
        first = rows[0]
        fill = first.find_element(By.CLASS_NAME, "fill").size["width"]
        track = first.find_element(By.CLASS_NAME, "track").size["width"]
        assert fill == pytest.approx(track * probs[0], abs=2)
        assert first.find_element(By.CLASS_NAME, "prob").text == f"{100 * probs[0]:.1f}%"
        assert browser.find_element(By.CSS_SELECTOR, "#results .result .name").text == "bird.png"
        preview = browser.find_element(By.CSS_SELECTOR, "#results .result img")
        assert browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", preview) == 128
        shot = tmp_path / "serve-page.png"
        assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 5000
        pixels = np.asarray(Image.open(shot).convert("RGB"))
        assert pixels.std() > 10  # not a blank page

        # A file that is not an image: the server's message appears on the page.
        browser.find_element(By.ID, "file").send_keys(str(not_image))
        wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "error")
        status = browser.find_element(By.ID, "status")
        assert "is not an image" in status.text and status.get_attribute("class") == "error"
    finally:
        server.stop()
