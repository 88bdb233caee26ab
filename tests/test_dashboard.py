"""``cifarlab sweep dashboard DIR``: optuna-dashboard on the sweep's storage, bound to 127.0.0.1, loaded in
headless Chromium (skipped when Chromium or optuna-dashboard is missing)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from .conftest import REPO

pytest.importorskip("optuna_dashboard")
CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def sweep_dir(tmp_path):
    """A sweep directory as `sweep run` leaves it (study.json + SQLite storage) with four finished trials."""
    import optuna

    d = tmp_path / "sweeps" / "dash-study"
    d.mkdir(parents=True)
    url = f"sqlite:///{d / 'study.db'}"
    st = optuna.create_study(study_name="dash-study", storage=url, direction="maximize")
    st.optimize(lambda t: t.suggest_float("optim.lr", 1e-4, 1e-2, log=True), n_trials=4)
    (d / "study.json").write_text(json.dumps({"study": "dash-study", "storage": url}))
    return d


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
def test_dashboard_page_shows_trials(sweep_dir, tmp_path):
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "cifarlab", "sweep", "dashboard", str(sweep_dir), "--port",
                             str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=REPO, text=True)
    try:
        api = f"http://127.0.0.1:{port}/api/studies"
        t0 = time.monotonic()
        while True:  # until the server answers or its process ends, however slowly it starts
            try:
                raw = json.loads(urllib.request.urlopen(api, timeout=10).read())
                studies = raw.get("studies", raw.get("study_summaries", []))
                break
            except OSError:
                if proc.poll() is not None:
                    pytest.fail(proc.stdout.read())
                if time.monotonic() - t0 > 900:  # a deadlock guard, not a speed limit
                    pytest.fail("the dashboard did not answer in 15 minutes")
                time.sleep(0.1)
        (study,) = [s for s in studies if s["study_name"] == "dash-study"]
        sid = study["study_id"]
        # bound to loopback only
        ip = socket.gethostbyname(socket.gethostname())
        if not ip.startswith("127."):
            with pytest.raises(OSError):
                socket.create_connection((ip, port), timeout=1).close()
        page = f"http://127.0.0.1:{port}/dashboard/studies/{sid}/trials"
        dom = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'chr'}",
                              "--virtual-time-budget=15000", "--dump-dom", page],
                             capture_output=True, text=True, timeout=900).stdout  # a deadlock guard
        assert "dash-study" in dom
        for n in range(4):
            assert f"Trial {n}" in dom, f"trial {n} not on the page"
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_dashboard_needs_a_sweep_dir(tmp_path, capsys):
    from .test_report import main_exit

    assert main_exit(["sweep", "dashboard", str(tmp_path)]) == 2
    assert "not a sweep directory" in capsys.readouterr().err
