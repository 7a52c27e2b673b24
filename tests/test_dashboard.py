"""The comparison dashboard of a real (small) sweep, opened in headless Chromium: no console errors, every
architecture in the summary table, the plots as embedded images, run links to the MLflow UI; a screenshot is
saved under test-artifacts/."""
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from echoes.compare import client, dashboard
from echoes.sweep import load_sweep, run_sweep

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]


def _need_chromium():
    if CHROMIUM is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is not installed (make services installs it); CI must run the browser test")
        pytest.skip("chromium is not installed: `apt-get install -y chromium chromium-driver` (make services)")


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    "A smoke sweep run for real, and its dashboard page."
    _need_chromium()
    uri = f"sqlite:///{tmp_path_factory.mktemp('dash') / 'mlflow.db'}"
    s = run_sweep(ROOT / "sweeps" / "smoke.yaml", parallel=2, tracking_uri=uri, progress=False)
    assert s["failed"] == 0, s
    out = dashboard(tracking_uri=uri, parent=s["parent_run_id"])
    return uri, s, out


def _serve(path: Path, port: int):
    proc = subprocess.Popen([sys.executable, "-c", "import sys; from echoes.compare import serve_page; "
                             "serve_page(sys.argv[1], int(sys.argv[2]))", str(path), str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/{path.name}"
    for _ in range(100):
        try:
            urllib.request.urlopen(url, timeout=1).read(); return proc, url
        except OSError:
            if proc.poll() is not None: raise RuntimeError(proc.stdout.read()) from None
            time.sleep(0.1)
    proc.kill(); raise RuntimeError("the dashboard server did not start")


@pytest.mark.slow
def test_dashboard_file_and_artifact(page):
    uri, s, out = page
    assert out.exists() and out.suffix == ".html" and out.parent.name == "dashboard"
    text = out.read_text()
    assert "<script src=" not in text, "the page loads nothing from the network"
    assert len(re.findall(r'<img[^>]*src="data:image/png;base64,', text)) == 5, "plots are embedded as images"
    arts = [a.path for a in client(uri).list_artifacts(s["parent_run_id"])]
    assert "dashboard.html" in arts


@pytest.mark.slow
def test_dashboard_in_chromium(page, tmp_path):
    from services import free_port
    from playwright.sync_api import sync_playwright
    uri, s, out = page
    models = sorted(load_sweep(ROOT / "sweeps" / "smoke.yaml").models)
    proc, url = _serve(out, free_port())
    errors = []
    try:
        with sync_playwright() as p:
            ctx = p.chromium.launch_persistent_context(
                str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True, args=FLAGS,
                viewport={"width": 1280, "height": 900})
            pg = ctx.new_page()
            pg.on("console", lambda m: errors.append(f"console.{m.type}: {m.text}") if m.type == "error" else None)
            pg.on("pageerror", lambda e: errors.append(f"page error: {e}"))
            pg.on("requestfailed", lambda r: errors.append(f"request failed: {r.url}"))
            resp = pg.goto(url, wait_until="load")
            assert resp is not None and resp.ok
            pg.wait_for_timeout(300)  # late console messages
            summary = pg.locator("table.echoes-summary")
            assert summary.count() == 1
            archs = summary.locator("tbody tr td:first-child").all_inner_texts()
            assert sorted(archs) == models
            header = " ".join(summary.locator("thead th").all_inner_texts())
            for col in ("test accuracy", "train time", "latency", "peak memory", "trainable params", "Welch"):
                assert col in header
            assert "±" in summary.inner_text()
            # trade-offs, learning curves, per-class accuracy, the ESN grid, architectures
            imgs = pg.locator("img[src^='data:image/png']")
            assert imgs.count() == 5
            sizes = pg.eval_on_selector_all("img[src^='data:image/png']", "els => els.map(e => e.naturalWidth)")
            assert all(w > 100 for w in sizes), "every plot decodes to a real image"
            hrefs = pg.eval_on_selector_all("table.echoes-runs a", "els => els.map(e => e.href)")
            assert len(hrefs) == s["total"]
            assert all(re.match(r"http://127\.0\.0\.1:5000/#/experiments/\d+/runs/[0-9a-f]{32}$", h) for h in hrefs)
            assert "Significance test" in pg.inner_text("body")
            shots = ROOT / "test-artifacts"
            shots.mkdir(exist_ok=True)
            pg.screenshot(path=str(shots / "dashboard.png"), full_page=True)
            ctx.close()
    finally:
        proc.terminate(); proc.wait(10)
    assert not errors, errors
    assert (ROOT / "test-artifacts" / "dashboard.png").stat().st_size > 10_000
