#!/usr/bin/env bash
# Headless Chromium (and a font for the page's text) for tests/test_report.py and tests/test_compare.py,
# which render the HTML reports, and Debian's chromedriver for tests/test_serve_browser.py, which drives
# cifarlab serve's page with selenium.
set -euo pipefail
if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1 \
    && dpkg -s fonts-dejavu-core >/dev/null 2>&1; then
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends chromium chromium-driver fonts-dejavu-core >/dev/null
chromium --version 2>/dev/null || true
chromedriver --version 2>/dev/null || true
