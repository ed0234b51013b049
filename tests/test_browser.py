"""Notebooks in a real browser: JupyterLab on loopback, Debian's Chromium headless driven
by Playwright, Run All, and what a person would see: the quickstart with the widgets
dashboard, and the html dashboard (display="html", no widgets) blocking and in the background.

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
from browser.notebook_page import (CHROMIUM, CHROMIUM_ARGS, HTML_WATCH_JS, WATCH_JS, code_cell, open_notebook,
                                   run_all, wait_all_executed, watched, watched_html)

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


HTML_CELLS = [
    """import time
from notebook_launcher import notebook_launcher, report, progress

def train(steps):
    for step in progress(range(steps), desc="step"):
        report(step, loss=1.0 / (step + 1))
        if step % 50 == 0:
            print("at step", step, flush=True)
        time.sleep(0.02)
    return steps""",
    'print("RESULT", notebook_launcher(train, args=(200,), num_processes=2, display="html"))',
    'run = notebook_launcher(train, args=(200,), num_processes=2, display="html", block=False)',
    'time.sleep(2); print("meanwhile", run.status)',
    'print("BACKGROUND", run.result(120))',
]


def test_html_dashboard_renders_updates_live_and_ends_as_the_summary(playwright, tmp_path):
    """The html view in JupyterLab: a blocking run's display moves live and becomes the
    summary; a block=False run's display, in its launching cell, moves while the next cell
    runs and becomes the summary too. Not a widget anywhere on the page."""
    import nbformat

    os.makedirs(ARTIFACTS, exist_ok=True)
    root = tmp_path / "root"
    root.mkdir()
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(source) for source in HTML_CELLS]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}  # no kernel picker
    nbformat.write(nb, str(root / "html.ipynb"))
    browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
    lab = JupyterLab(str(root), os.path.join(ARTIFACTS, "jupyterlab-html.log"))
    page = None
    try:
        lab.start()
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        open_notebook(page, lab.url("lab/tree/html.ipynb"))
        page.evaluate(HTML_WATCH_JS)
        run_all(page)
        wait_all_executed(page, RUN_TIMEOUT)
        blocking, background = code_cell(page, "display=\"html\"))"), code_cell(page, "block=False")
        page.wait_for_function("() => [...document.querySelectorAll('.jp-CodeCell')][2]"
                               ".innerText.includes('✔ succeeded')", timeout=60_000)
        seen = watched_html(page)
        page.screenshot(path=os.path.join(ARTIFACTS, "html-page.png"))
        blocking.screenshot(path=os.path.join(ARTIFACTS, "html-blocking-summary.png"))

        # live: several frames, the step count moving, the inline plot loaded
        for cell in ("1", "2"):
            steps = seen["steps"].get(cell, [])
            assert len(seen["frames"].get(cell, [])) >= 3 and len(steps) >= 3, (cell, seen)
            assert steps == sorted(steps) and steps[0] < steps[-1] <= 200, (cell, steps)
        assert seen["liveImages"] >= 2, seen["liveImages"]

        # the end: the static summary, with its plot, and no live frame left
        for cell in (blocking, background):
            output = cell.locator(".jp-OutputArea")
            text = output.inner_text()
            assert "✔ succeeded" in text and "200/200" in text and "2 CPU processes (gloo, fork)" in text, text
            assert output.locator(".notebook-launcher-dashboard").count() == 0
            plots = output.locator("img")
            assert plots.count() >= 1 and plots.first.evaluate("img => img.complete && img.naturalWidth > 200")
        assert "RESULT 200" in blocking.inner_text() and "at step 150" in blocking.inner_text()
        meanwhile = code_cell(page, "meanwhile").locator(".jp-OutputArea").inner_text()
        assert "meanwhile running" in meanwhile and "succeeded" not in meanwhile   # nothing leaked into it
        assert "BACKGROUND 200" in code_cell(page, "BACKGROUND").inner_text()
        assert page.locator(".jupyter-widgets, .widget-hprogress").count() == 0
        assert "Error displaying widget" not in page.inner_text("body")
        print(f"\nframes seen: blocking {len(seen['frames']['1'])}, background {len(seen['frames']['2'])}; "
              f"steps {seen['steps']['1'][:3]}...{seen['steps']['1'][-1]}")
    except Exception:
        if page is not None:
            page.screenshot(path=os.path.join(ARTIFACTS, "html-failure.png"))
        raise
    finally:
        pgid = lab.process.pid if lab.process is not None else None
        try:
            browser.close()
        finally:
            lab.stop()
    assert pgid is None or not group_members(pgid), "JupyterLab's processes outlived it"


def _code_cells(path) -> int:
    import nbformat

    return sum(c.cell_type == "code" for c in nbformat.read(str(path), as_version=4).cells)
