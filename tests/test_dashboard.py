"""The comparison dashboard of a real (small) sweep, opened in headless Chromium: no console errors, every
architecture in the summary table, the plots as embedded images, run links to the MLflow UI; a screenshot is
saved under test-artifacts/. And the page of runs whose names, tags, params and error text hold HTML: all of it
shown as text, none of it run."""
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


SCRIPT = "<script>window.__pwned=1</script>"
IMG = '"><img src=x onerror="window.__pwned=1">'
SVG = "<svg onload=window.__pwned=1>"
ERROR = f"{IMG}{SCRIPT}"
MATH = r"$\frac{$"  # not HTML, but a plot label that matplotlib would parse as math, and fail on


@pytest.fixture(scope="module")
def hostile_page(tmp_path_factory):
    """Runs whose names, tags, params, class names, experiment and error text hold HTML, in a real store: one
    trained for real, one failed for real, the rest written straight into MLflow (the store is the boundary:
    anyone can write to it through its UI or API), and their dashboard page."""
    _need_chromium()
    from types import SimpleNamespace
    from echoes.core import toy_sequences
    from echoes.tracking import run_experiment, start_run
    d = tmp_path_factory.mktemp("hostile")
    uri, exp = f"sqlite:///{d / 'mlflow.db'}", f"exp {IMG}"
    common = dict(experiment=exp, tracking_uri=uri, progress=False, log_model=False, tensorboard=False)
    train, val, test = (toy_sequences(n, num_classes=2, T=8, D=3, seed=s, task="position")
                        for n, s in ((64, 0), (16, 1), (32, 2)))
    splits = SimpleNamespace(train=train, val=val, test=test, classes=[SCRIPT, IMG])
    trained = run_experiment(dict(model="mean", epochs=1, seed=0, **common), splits=splits, tags={"echoes.note": IMG})
    with pytest.raises(RuntimeError), start_run(dict(model="esn", run_name=f"failed {SVG}", **common)):
        raise RuntimeError(ERROR)
    c = client(uri)
    c.set_tag(trained["run_id"], "mlflow.runName", SCRIPT)  # a rename, as the MLflow UI does it
    eid = c.get_experiment_by_name(exp).experiment_id
    metrics = dict(test_acc=0.5, val_acc=0.5, train_time_s=1.0, latency_ms=0.1, peak_mem_mb=10, trainable_params=100)
    for name, params, tags in [(IMG, {"model": "gru", "hidden_size": IMG, "seed": 0}, {}),
                               ("gru-plain", {"model": "gru", "hidden_size": 16, "seed": 0}, {}),
                               ("tagged", {"seed": 0}, {"echoes.model": SVG}),
                               ("math", {"seed": 0}, {"echoes.model": MATH})]:
        rid = c.create_run(eid, run_name=name, tags=tags).info.run_id
        for k, v in params.items(): c.log_param(rid, k, v)
        for k, v in metrics.items(): c.log_metric(rid, k, v)
        c.set_terminated(rid, "FINISHED")
    return dashboard(tracking_uri=uri, experiment=exp, out=d / "dashboard" / "hostile.html")


@pytest.mark.slow
def test_dashboard_escapes_run_values(hostile_page, tmp_path):
    from playwright.sync_api import sync_playwright
    errors = []
    with sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True,
                                                   args=FLAGS)
        pg = ctx.new_page()
        pg.on("pageerror", lambda e: errors.append(f"page error: {e}"))
        pg.on("requestfailed", lambda r: errors.append(f"request failed: {r.url}"))  # an injected <img src=x>
        pg.goto(hostile_page.as_uri(), wait_until="load")
        pg.wait_for_timeout(200)
        dom = pg.evaluate("""() => ({
            pwned: typeof window.__pwned,
            handlers: document.querySelectorAll("[onerror], [onload]").length,
            foreign_imgs: [...document.images].filter(i => !i.src.startsWith("data:image/png")).length,
            scripts: [...document.scripts].filter(s => s.textContent.includes("__pwned")).length,
            svgs: [...document.querySelectorAll("svg")].filter(s => s.outerHTML.includes("__pwned")).length})""")
        text = pg.inner_text("body")
        links = pg.eval_on_selector_all("table.echoes-runs a", "els => els.map(e => [e.textContent, e.href])")
        failed = pg.locator("ul.echoes-failed li").all_inner_texts()
        ctx.close()
    assert dom == dict(pwned="undefined", handlers=0, foreign_imgs=0, scripts=0, svgs=0), dom
    assert not errors, errors
    for s in (f"exp {IMG}", SCRIPT, f"gru (hidden_size={IMG})", SVG, MATH, f"failed {SVG}", f"RuntimeError: {ERROR}"):
        assert s in text, f"{s!r} is not shown as text"
    assert SCRIPT in dict(links) and all(re.match(r"http://127\.0\.0\.1:5000/#/experiments/\d+/runs/[0-9a-f]{32}$", h)
                                         for _, h in links)
    assert failed == [f"failed {SVG}: RuntimeError: {ERROR}"]


@pytest.fixture(scope="module")
def search_page(tmp_path_factory):
    """A search sweep's record in a real store (as the search writes it; `test_compare.log_search_sweep`), with HTML
    in the protocol's device and in a selected choice, and its dashboard page."""
    from test_compare import log_search_sweep
    d = tmp_path_factory.mktemp("search-dash")
    uri = f"sqlite:///{d / 'mlflow.db'}"
    parent = log_search_sweep(uri, device=f"cpu {IMG}", choice=SCRIPT)
    return dashboard(tracking_uri=uri, parent=parent, out=d / "dashboard" / "search.html").read_text()


@pytest.mark.slow
def test_search_dashboard(search_page):
    from html import unescape
    text = search_page
    order = [text.index(s) for s in ("Is the comparison fair?", "<h2 id=\"search\"", "echoes-final", "<h2 id=\"Runs\"")]
    assert order == sorted(order), "the fairness header first, then the search, the final table, the runs"
    plain = unescape(re.sub(r"<[^>]+>", "", text))
    assert "Fair: equal budgets, the same seeds, the same features, selection on validation." in plain
    assert "budgets: every architecture was granted 4 trials; training spent 2 s (esn) to 20 s (lstm)" in plain
    assert "seeds: seeds 0, 1, 2, 3, 4 for every architecture (5 paired seeds)" in plain
    assert "features: identical in every final run: dataset=synthetic, classes=16, fold=1" in plain
    assert re.search(r"Conclusion: gru is best \(0\.9\d\d \[0\.9\d\d, 0\.9\d\d\], bootstrap 95% CI over 5 seeds\); "
                     r"esn and lstm are not distinguishable from it at 5 seeds", plain)
    assert len(re.findall(r'<img[^>]*src="data:image/png;base64,', text)) == 3, \
        "the search history, the P(beats) matrix, the trade-offs (and no ESN grid drawn from search trials)"
    budget = re.search(r'<table[^>]*echoes-budget.*?</table>', text, re.S).group(0)
    assert budget.count("<tr") == 1 + 4 and "trials granted" in budget and "train s spent" in budget
    final = re.search(r'<table[^>]*echoes-final.*?</table>', text, re.S).group(0)
    for col in ("bootstrap 95% CI", "t 95% CI", "diff vs best", "p (paired t, Holm)", "d_z", "P(beats best)",
                "trainable params", "trials", "train s"):
        assert f"<th>{col}</th>" in final
    assert re.findall(r"<td>(best|n\.s\.|worse)</td>", final) == ["best", "n.s.", "n.s.", "worse"]
    assert "Paired tests:" in plain and "Holm-corrected" in plain
    assert "<script>window.__pwned" not in text and "<img src=x" not in text  # the protocol's text, escaped
    assert f"cpu {IMG}" in plain and SCRIPT in plain  # ... and shown
