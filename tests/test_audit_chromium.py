"""``audit.html`` in a real browser: headless Chromium driven by selenium through Debian's chromedriver, as
tests/test_serve_browser.py drives the serving page (not marked slow, like it).

The page is written by :func:`cifarlab.report.audit.write_audit_html` from small synthetic results (label
issues, duplicate pairs, odd images over generated images) with the Grad-CAM heatmaps of a real trained run
beside each label issue. The browser must decode every image (``naturalWidth > 0``), show the counts table and
the three galleries with the right number of cards, and log no JavaScript error. A second test breaks one
image and checks that the same check sees it. CI installs chromium and chromium-driver
(.ci/deps/chromium.sh); under CI=true a skip is a failure.
"""

from __future__ import annotations

import numpy as np
import pytest

from cifarlab.report.audit import write_audit_html

from .browser import headless_chromium

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
N_IMAGES, N_ISSUES, N_PAIRS, N_ODD = 30, 7, 4, 3


@pytest.fixture
def chromium(tmp_path):
    # console=True: the browser's console, for JavaScript errors
    with headless_chromium(tmp_path / "chromium-profile", window=(1200, 900), console=True) as driver:
        yield driver


def synthetic_audit(out, model_of=None):
    """audit.html over N_IMAGES generated 32x32 images with N_ISSUES label issues, N_PAIRS pairs, N_ODD odd."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (N_IMAGES, 32, 32, 3), dtype=np.uint8)
    images[3] = 0  # a dark one among the odd images
    paths = [f"train/{CLASSES[i % 10]}/{i:04d}.png" for i in range(N_IMAGES)]
    issues = [{"i": i, "path": paths[i], "split": "train", "given": CLASSES[i % 10],
               "suggested": CLASSES[(i + 1) % 10], "score": 0.1 * i, "y": i % 10} for i in range(N_ISSUES)]
    pairs = [{"i": 10 + k, "j": 20 + k, "path_a": paths[10 + k], "split_a": "train", "path_b": paths[20 + k],
              "split_b": "test", "distance": 0.01 * k, "kind": "leak (near)", "y": (10 + k) % 10}
             for k in range(N_PAIRS)]
    odd = [{"i": i, "path": paths[i], "split": "train", "kind": "dark", "score": 0.9, "label": CLASSES[i % 10],
            "y": i % 10} for i in range(3, 3 + N_ODD)]
    return write_audit_html(out, lambda i: images[i], {"label_issues": issues, "duplicates": pairs, "outliers": odd},
                            CLASSES, "synthetic results", model_of=model_of)


def page_state(driver, html):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(html.as_uri())
    WebDriverWait(driver, 120).until(
        lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-images-loaded") is not None)
    imgs = driver.execute_script(
        "return Array.from(document.images).map(function (i) { return [i.naturalWidth, i.className, "
        "i.closest('section').querySelector('h2').textContent]; });")
    errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    return imgs, errors


def test_audit_page_renders_in_chromium(trained_run, tmp_path, chromium):
    from selenium.webdriver.common.by import By

    html = synthetic_audit(tmp_path, model_of=lambda i: trained_run)
    imgs, errors = page_state(chromium, html)
    assert errors == [], errors
    assert imgs and all(w > 0 for w, _, _ in imgs), [i for i in imgs if i[0] == 0]
    body = chromium.find_element(By.TAG_NAME, "body")
    assert body.get_attribute("data-images-loaded") == body.get_attribute("data-images-total") == str(len(imgs))
    # The counts table: one row per kind, with the numbers written.
    counts = chromium.find_element(By.XPATH, "//section[h2='Counts']//table")
    rows = {r.find_elements(By.TAG_NAME, "td")[0].text: r.find_elements(By.TAG_NAME, "td")[1].text
            for r in counts.find_elements(By.CSS_SELECTOR, "tbody tr")}
    assert rows == {"label issues": str(N_ISSUES), "duplicates: leak (near)": str(N_PAIRS),
                    "odd images: dark": str(N_ODD)}
    assert len(chromium.find_elements(By.XPATH, "//section[h2='By class (given label)']//tbody/tr")) == len(CLASSES)
    # The galleries: each label issue with its heatmap, pairs side by side, the odd images.
    by_section = {}
    for _, cls, heading in imgs:
        by_section.setdefault(heading.split(" (")[0].split(",")[0], []).append(cls)
    assert by_section["Label issues"].count("heat") == N_ISSUES and len(by_section["Label issues"]) == 2 * N_ISSUES
    assert len(by_section["Duplicates and leaks"]) == 2 * N_PAIRS
    assert len(by_section["Odd images"]) == N_ODD
    for card in chromium.find_elements(By.CSS_SELECTOR, ".card.explained"):
        image, heat = card.find_elements(By.TAG_NAME, "img")
        assert image.size == heat.size and image.size["width"] >= 96  # laid out, not collapsed
        assert image.location["y"] == heat.location["y"]  # side by side
        assert heat.location["x"] >= image.location["x"] + image.size["width"]
    shot = tmp_path / "audit.png"
    chromium.save_screenshot(str(shot))
    assert shot.stat().st_size > 0


def test_the_check_sees_a_broken_image(tmp_path, chromium):
    html = synthetic_audit(tmp_path)
    page = html.read_text()
    start = page.index('src="data:image/png;base64,') + len('src="data:image/png;base64,')
    html.write_text(page[:start] + "AAAA" + page[start + 4:])  # the first image's PNG signature destroyed
    imgs, _ = page_state(chromium, html)
    assert sum(w == 0 for w, _, _ in imgs) == 1
