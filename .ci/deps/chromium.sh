#!/usr/bin/env bash
# Headless Chromium for tests/test_report.py and tests/test_compare.py: they render the HTML reports.
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends chromium >/dev/null
chromium --version
