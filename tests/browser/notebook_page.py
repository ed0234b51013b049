"""Driving a notebook in JupyterLab through Playwright, and watching what the page shows.

The dashboard lives only while the run does (it is replaced by a static summary at the
end), so a `MutationObserver` installed in the page records what the live widgets showed:
the fullest each progress bar got, whether the plot image was loaded, and any
"Error displaying widget" text, however briefly it appeared.
"""

from __future__ import annotations

import time

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

# window.__watch: {bars: {label: max percent}, liveImages: count of loaded widget images,
# widgetErrors: [texts], progressSeen: bool}. ipywidgets 8 renders IntProgress as
# .widget-hprogress > .progress > .progress-bar with style width "NN%"; the dashboard puts
# each bar in an HBox after an HTML label.
WATCH_JS = """
() => {
  if (window.__watch) return;
  const watch = {bars: {}, liveImages: 0, widgetErrors: [], progressSeen: false};
  window.__watch = watch;
  const scan = () => {
    for (const bar of document.querySelectorAll('.widget-hprogress .progress-bar')) {
      watch.progressSeen = true;
      const row = bar.closest('.widget-hprogress').parentElement;
      const label = (row && row.firstElementChild ? row.firstElementChild.textContent : '').trim();
      if (!label) continue;   // the label text comes with the slower text updates
      const percent = parseFloat(bar.style.width || '0');
      if (!(label in watch.bars) || percent > watch.bars[label]) watch.bars[label] = percent;
    }
    for (const img of document.querySelectorAll('.widget-image')) {
      if (img.complete && img.naturalWidth > 0 && !img.__counted) { img.__counted = true; watch.liveImages += 1; }
      else if (!img.__listening) { img.__listening = true; img.addEventListener('load', scan); }
    }
    const text = document.body.innerText || '';
    if (text.includes('Error displaying widget')) {
      const at = text.indexOf('Error displaying widget');
      watch.widgetErrors.push(text.slice(at, at + 200));
    }
  };
  new MutationObserver(scan).observe(document.body, {subtree: true, childList: true, attributes: true,
                                                     attributeFilter: ['style', 'src', 'class']});
  scan();
}
"""


# window.__html: what the html dashboard (display="html": one display updated in place,
# no widgets) showed while it lived, per launching cell (its prompt's cell index):
# {frames: {cell: [distinct frame texts]}, steps: {cell: [step counts seen, in order]},
# liveImages: count of loaded inline plots}.
HTML_WATCH_JS = r"""
() => {
  if (window.__html) return;
  const watch = {frames: {}, steps: {}, liveImages: 0};
  window.__html = watch;
  const cells = () => [...document.querySelectorAll('.jp-CodeCell')];
  const scan = () => {
    const all = cells();
    for (const board of document.querySelectorAll('.notebook-launcher-dashboard')) {
      const cell = all.indexOf(board.closest('.jp-CodeCell'));
      const text = board.innerText;
      const frames = watch.frames[cell] = watch.frames[cell] || [];
      if (frames[frames.length - 1] !== text) frames.push(text);
      const found = text.match(/step\s+[█░]*\s*(\d+)\/(\d+)/);
      if (found) {
        const steps = watch.steps[cell] = watch.steps[cell] || [];
        const n = parseInt(found[1]);
        if (steps[steps.length - 1] !== n) steps.push(n);
      }
      for (const img of board.querySelectorAll('img.notebook-launcher-plot')) {
        if (img.complete && img.naturalWidth > 0 && !img.__counted) { img.__counted = true; watch.liveImages += 1; }
        else if (!img.__listening) { img.__listening = true; img.addEventListener('load', scan); }
      }
    }
  };
  new MutationObserver(scan).observe(document.body, {subtree: true, childList: true, characterData: true});
  scan();
}
"""


def open_notebook(page, url: str, timeout_s: float = 90) -> None:
    """Load the notebook and wait until its kernel is idle."""
    page.goto(url, timeout=timeout_s * 1000)
    page.wait_for_selector(".jp-NotebookPanel .jp-Notebook .jp-Cell", timeout=timeout_s * 1000)
    wait_kernel_idle(page, timeout_s)


def wait_kernel_idle(page, timeout_s: float) -> None:
    """The status bar says "<kernel name> | Idle" (the toolbar's indicator is idle even before
    a kernel is attached, so it is not enough)."""
    page.wait_for_function(
        """() => [...document.querySelectorAll('.jp-StatusBar-TextItem')]
                 .some(item => /\\S \\| Idle$/.test(item.textContent.trim()) && !item.textContent.includes('No Kernel'))""",
        timeout=timeout_s * 1000, polling=250)


def run_all(page) -> None:
    """Run > Run All Cells, through the menu as a person would."""
    page.get_by_role("menuitem", name="Run", exact=True).click()
    page.get_by_role("menuitem", name="Run All Cells").first.click()


def code_cell(page, contains: str):
    """The code cell whose input contains ``contains``."""
    cells = page.locator(".jp-CodeCell").filter(has=page.locator(".jp-InputArea", has_text=contains))
    assert cells.count() == 1, f"{cells.count()} code cells contain {contains!r}"
    return cells.first


def wait_all_executed(page, timeout_s: float) -> list:
    """Wait until every code cell shows an execution count ``[n]:``; return those prompts."""
    deadline = time.monotonic() + timeout_s
    prompts: list = []
    while time.monotonic() < deadline:
        prompts = page.locator(".jp-CodeCell .jp-InputArea-prompt").all_inner_texts()
        if prompts and all(p.strip()[1:-2].strip().isdigit() for p in prompts):
            return prompts
        time.sleep(0.25)
    raise TimeoutError(f"cells still running or not run after {timeout_s}s: {prompts}")


def watched(page) -> dict:
    return page.evaluate("() => window.__watch")


def watched_html(page) -> dict:
    return page.evaluate("() => window.__html")
