"""The quickstart notebook in a real browser: JupyterLab on loopback, Debian's Chromium
headless driven by Playwright, Run All, and what a person would see.

Needs ``/usr/bin/chromium`` (apt package ``chromium``) and the ``playwright`` Python
package; skipped, saying which is missing, without them. Nothing is downloaded: Playwright
drives the system Chromium. Screenshots go to ``artifacts/browser/``.
"""

from __future__ import annotations

import os
import shutil
import time

import psutil
import pytest

from browser.jupyterlab import JupyterLab, group_members
from browser.notebook_page import (CHROMIUM, CHROMIUM_ARGS, WATCH_JS, code_cell, open_notebook, run_all,
                                   wait_all_executed, watched)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = "01-quickstart.ipynb"
ARTIFACTS = os.path.join(REPO, "artifacts", "browser")
RUN_TIMEOUT = 150   # seconds for Run All (about 15 s on 2 cores)

pytestmark = [
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is missing (apt-get install chromium)"),
    pytest.mark.timeout(300),
]


@pytest.fixture
def playwright():
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is missing (pip install playwright)")
    with sync_api.sync_playwright() as driver:
        yield driver


def test_quickstart_dashboard_in_jupyterlab(playwright, tmp_path):
    os.makedirs(ARTIFACTS, exist_ok=True)
    root = tmp_path / "root"
    root.mkdir()
    shutil.copy(os.path.join(REPO, "notebooks", NOTEBOOK), root / NOTEBOOK)
    browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
    lab = JupyterLab(str(root), os.path.join(ARTIFACTS, "jupyterlab.log"))
    server_tree: list = []
    page = None
    try:
        lab.start()
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        console_errors: list = []
        page.on("console", lambda msg: console_errors.append(msg.text) if msg.type == "error" else None)
        open_notebook(page, lab.url(f"lab/tree/{NOTEBOOK}"))
        page.evaluate(WATCH_JS)
        started = time.monotonic()
        run_all(page)

        live = _screenshot_live_dashboard(page)
        prompts = wait_all_executed(page, RUN_TIMEOUT)
        seconds = time.monotonic() - started
        server_tree = [p.pid for p in psutil.Process(lab.process.pid).children(recursive=True)]

        launch = code_cell(page, "result = notebook_launcher(train")
        launch.scroll_into_view_if_needed()
        launch.screenshot(path=os.path.join(ARTIFACTS, "01-quickstart-summary.png"))
        page.screenshot(path=os.path.join(ARTIFACTS, "01-quickstart-page.png"))   # the notebook scrolls inside
        seen = watched(page)

        # the live dashboard rendered as widgets, and its bars filled up
        assert seen["progressSeen"], "no progress bar widget was ever rendered"
        assert seen["bars"].get("epoch", 0) >= 99.99, f"the epoch bar stopped at {seen['bars']}"
        assert seen["liveImages"] >= 1, "the live loss plot image never loaded"
        assert not seen["widgetErrors"], seen["widgetErrors"]
        assert "Error displaying widget" not in page.inner_text("body")

        # the static summary that replaced it: status, what ran, full bars, the final plot
        output = launch.locator(".jp-OutputArea")
        summary = output.inner_text()
        assert "✔ succeeded" in summary and "2 CPU processes (gloo, fork)" in summary, summary
        assert "12/12" in summary, summary
        plots = output.locator("img")
        assert plots.count() >= 1, "no plot image in the summary"
        assert plots.first.evaluate("img => img.complete && img.naturalWidth > 200"), "the plot did not load"
        assert output.locator(".widget-hprogress").count() == 0, "live widgets were left in the output"

        # the rest of the notebook ran on the returned result
        result_text = code_cell(page, "print(f\"{result['workers']} workers").locator(".jp-OutputArea").inner_text()
        assert "2 workers, 252 steps each, test accuracy 0.9" in result_text, result_text
        assert code_cell(page, "import matplotlib.pyplot").locator(".jp-OutputArea img").count() == 1
        assert len(prompts) == _code_cells(root / NOTEBOOK)
        stderr = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']")
        assert not stderr.filter(has_text="Error").count(), stderr.all_inner_texts()
        assert not [e for e in console_errors if "widget" in e.lower()], console_errors
        print(f"\nRun All took {seconds:.1f} s; bars at most {seen['bars']}; live screenshot: {live}")
    except Exception:
        if page is not None:   # what the page looked like when it went wrong
            page.screenshot(path=os.path.join(ARTIFACTS, "01-quickstart-failure.png"))
        raise
    finally:
        pgid = lab.process.pid if lab.process is not None else None
        try:
            browser.close()
        finally:
            lab.stop()
    assert pgid is None or not group_members(pgid), "JupyterLab's processes outlived it"
    assert not [pid for pid in server_tree if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE], \
        "kernel processes outlived JupyterLab"


def _screenshot_live_dashboard(page) -> str:
    """Best effort: the dashboard while the workers train (a few seconds). Given up as soon
    as the run is over (its summary replaced the live view), not after a fixed wait: a
    blind 60 s wait for a live image that was already gone cost CI a minute."""
    path = os.path.join(ARTIFACTS, "01-quickstart-live.png")
    live_or_over = ("() => window.__watch.liveImages > 0 || "
                    "['✔ succeeded', '✖ failed'].some(end => (document.body.innerText || '').includes(end))")
    try:
        page.wait_for_function(live_or_over, timeout=60_000)
        image = page.query_selector(".widget-image")
        if image is None or not image.is_visible():
            return "not taken (the run was already over)"
        image.scroll_into_view_if_needed(timeout=2_000)
        page.screenshot(path=path, timeout=5_000)
        return path
    except Exception as exc:   # the summary screenshot still comes
        return f"not taken ({type(exc).__name__})"


def _code_cells(path) -> int:
    import nbformat

    return sum(c.cell_type == "code" for c in nbformat.read(str(path), as_version=4).cells)
