"""Headless Chromium driven by selenium through Debian's chromedriver, for the tests that load a page in a real
browser (tests/test_serve_browser.py, tests/test_audit_chromium.py): ``with headless_chromium(profile) as driver``.

Missing chromium or chromedriver skips the test, and fails it under CI=true (CI installs both:
.ci/deps/chromium.sh). The driver is named explicitly: selenium must not go looking for (or downloading) one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

import pytest


@contextlib.contextmanager
def headless_chromium(profile: Path, *, window: tuple[int, int], console: bool = False):
    """A selenium driver of headless Chromium with its profile in ``profile`` and a ``window`` (width, height)
    sized window, quit when the block ends. ``console``: keep the browser's console log (for JavaScript
    errors: ``driver.get_log("browser")``)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_exe = shutil.which("chromedriver")
    if exe is None or driver_exe is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium or chromedriver is not installed (.ci/deps/chromium.sh installs both)")
        pytest.skip("chromium or chromedriver is not installed (apt-get install chromium chromium-driver)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = exe
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--window-size={window[0]},{window[1]}", f"--user-data-dir={profile}"):
        opts.add_argument(flag)
    if console:
        opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=opts, service=Service(executable_path=driver_exe))
    try:
        driver.set_page_load_timeout(120)
        yield driver
    finally:
        driver.quit()
