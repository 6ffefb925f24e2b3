"""The real book in a browser: every page of the ``smoke`` build, read in headless Chromium.

``tests/test_book.py`` checks the build's machinery on a one-chapter test book; this test reads
the chapters themselves, as a reader gets them. The session fixture ``smoke_book`` (conftest.py)
builds the book once with ``book/build.py --profile smoke`` (the path of
``make book PROFILE=smoke``), or takes an already built ``_build/html`` from
``FUSE4SEG_SMOKE_BOOK``. The site is served from 127.0.0.1 by a thread and every page of the
table of contents is loaded in one Chromium (``tests/chromium.py``), then checked:

- no paragraph holds raw table markup (a ``| --- |`` row, or the em dash that CommonMark makes of
  ``---``): every table reached the page as an HTML table;
- each chapter has at least the HTML tables, images and typeset formulas it shows
  (:data:`EXPECTED`, counted on a smoke build; chapter 5's Table 2 and figures need the Harvard
  and GFP pairs of the shared data, which the build passes when present, as ``make`` does);
- every image loaded, and no formula is left raw (MathJax output elements, ``mjx-container``);
- chapter 1's slice viewer was rendered by the ipywidgets manager (sliders, checkbox, the
  viewer's figure);
- no error output, no stderr output, no "Traceback" on the page;
- no request left 127.0.0.1 (Chromium also resolves every other host to nothing), and every
  local request succeeded.

One full-page screenshot per page lands in the test's tmp folder (``screenshots/*.png``), with
``pages.json``, the counts read from each page.
"""

from __future__ import annotations

import base64
import json
import re
import time
from pathlib import Path

import pytest
import yaml
from chromium import CHROMIUM, CHROMIUM_FLAGS, DevTools, assert_offline, serve
from conftest import load_book_build

REPO = Path(__file__).resolve().parents[1]

# The build starts Jupyter kernels: one worker at a time (see tests/test_book.py).
pytestmark = [pytest.mark.slow, pytest.mark.browser, pytest.mark.xdist_group("kernels")]

build = load_book_build()

# Set window.__mathjaxDone when MathJax's first typesetting pass has finished (or at once on a
# page without MathJax); evaluated once the page has loaded (MathJax is a deferred script).
MATHJAX_DONE_JS = """(() => {
  if (window.__mathjaxWatch) return true;
  window.__mathjaxWatch = true;
  const mj = window.MathJax;
  if (!mj || !mj.startup || !mj.startup.promise) { window.__mathjaxDone = true; return true; }
  mj.startup.promise.then(() => { window.__mathjaxDone = true; });
  return true;
})()"""

# Minimum counts per page of the smoke book: HTML tables, output images (figures), typeset
# formulas. "pairs": what chapter 5 adds when the Harvard and GFP pairs are passed.
EXPECTED: dict[str, dict[str, int]] = {
    "book/intro": {"tables": 0, "images": 0, "math": 0},
    # label statistics, split, cache; panel, histograms, cache slices + the viewer's figure
    "book/01_data": {"tables": 3, "images": 4, "math": 0, "sliders": 2},
    "book/02_fusion_leader": {"tables": 2, "images": 5, "math": 1},
    "book/03_segmentation_follower": {"tables": 4, "images": 2, "math": 1},
    # methods, Algorithm 1, splits, x_f drift, the numbers, ...; curves and the glass box
    # (its learning-curve table has mean ± sd cells: the check of a split "± sd" runs on them)
    "book/04_bilevel_training": {"tables": 6, "images": 2, "math": 0, "sd_cells": 4},
    # without pairs: the metrics of trivial fusions and the paper's Table 2; one figure
    "book/05_fusion_benchmarks": {"tables": 2, "images": 1, "math": 0},
    # Table 1, Table 3, per-case Dice, the paired differences; Figures 3 and 4
    "book/06_results": {"tables": 4, "images": 2, "math": 0},
    # cache sizes, profiles, networks, CPU step, projection; the projection's formula
    "book/07_at_scale": {"tables": 5, "images": 0, "math": 1},
    "book/appendix_fusion_metrics": {"tables": 3, "images": 0, "math": 10},
    "book/api": {"tables": 3, "images": 0, "math": 0},
}
# with the Harvard and GFP pairs: Table 2 per kind and convention, losses, Figure 5
EXPECTED_WITH_PAIRS = {"book/05_fusion_benchmarks": {"tables": 9, "images": 3, "math": 0}}

PAGE_STATE_JS = r"""(() => {
  const article = document.querySelector("article") || document.body;
  const textOf = (el) => {  // the text a reader sees, minus formulas and code
    const copy = el.cloneNode(true);
    copy.querySelectorAll("mjx-container, code, pre, .math").forEach((e) => e.remove());
    return copy.textContent;
  };
  const rawRow = /\|\s*:?-{3,}:?\s*\|/;
  const dashRow = /\|\s*[\u2013\u2014]\s*\|\s*[\u2013\u2014]/;
  const rawTables = Array.from(article.querySelectorAll("p, li, dd"))
    .filter((el) => el.textContent.includes("|"))  // cheap first: the API page is huge
    .map(textOf)
    .filter((t) => rawRow.test(t) || dashRow.test(t))
    .map((t) => t.slice(0, 160));
  // table cells where a "± sd" is broken over lines: the text from the ± on has line boxes
  // at more than one height (fuse4seg.formatting.format_mean_sd binds the sd to its sign)
  const splitSd = Array.from(article.querySelectorAll("td"))
    .filter((td) => td.textContent.includes("\u00b1"))
    .filter((td) => {
      const walk = document.createTreeWalker(td, NodeFilter.SHOW_TEXT);
      for (let node = walk.nextNode(); node; node = walk.nextNode()) {
        const at = node.data.indexOf("\u00b1");
        if (at < 0) continue;
        const range = document.createRange();
        range.setStart(node, at);
        range.setEnd(node, node.data.length);
        const tops = new Set(Array.from(range.getClientRects()).map((r) => Math.round(r.top)));
        if (tops.size > 1) return true;
      }
      return false;
    })
    .map((td) => td.textContent.trim().slice(0, 40));
  const sdCells = Array.from(article.querySelectorAll("td"))
    .filter((td) => td.textContent.includes("\u00b1")).length;
  const images = Array.from(article.querySelectorAll("img"));
  const outputs = Array.from(article.querySelectorAll(".cell_output img, .output img"));
  return JSON.stringify({
    ready: document.readyState,
    url: location.href,
    title: document.title,
    tables: article.querySelectorAll("table").length,
    wideTables: Array.from(article.querySelectorAll("table"))
      // wider than the box that shows it (the theme's scrolling container, else the article)
      .map((t) => [t, t.closest(".pst-scrollable-table-container") || article])
      .filter(([t, box]) => t.scrollWidth > box.clientWidth + 2)
      .map(([t, box]) => `${(t.querySelector("th") || t).textContent.trim().slice(0, 60)} ` +
                         `(${t.scrollWidth} px in ${box.clientWidth} px)`),
    // code cells and code blocks wider than their box (they scroll sideways); not outputs,
    // where chapter 4 shows the package's own source (100 columns) as it is
    wideCode: Array.from(article.querySelectorAll("pre"))
      .filter((p) => !p.closest(".cell_output"))
      .filter((p) => p.scrollWidth > p.clientWidth + 1)
      .map((p) => `${p.textContent.split("\n").reduce((a, l) => l.length > a.length ? l : a, "")
                    .trim().slice(0, 60)} (${p.scrollWidth} px in ${p.clientWidth} px)`),
    images: outputs.length,
    imagesLoading: images.filter((i) => !i.complete).length,
    imagesBroken: images.filter((i) => i.complete && i.naturalWidth === 0).map((i) => i.src),
    figureSizes: outputs.map((i) => [i.naturalWidth, i.naturalHeight, i.clientWidth]),
    math: document.querySelectorAll("mjx-container").length,
    rawMath: document.querySelectorAll(".math:not(:has(mjx-container))").length,
    mathJaxDone: window.__mathjaxDone === true,
    widgetStates: document.querySelectorAll(
      'script[type="application/vnd.jupyter.widget-state+json"]').length,
    sliders: document.querySelectorAll(".widget-slider, .widget-hslider").length,
    checkboxes: document.querySelectorAll(".widget-checkbox").length,
    widgetImages: document.querySelectorAll(".widget-output img, .jupyter-widgets img").length,
    errors: document.querySelectorAll(".output.error, .output.traceback, .traceback").length,
    stderr: document.querySelectorAll(".output.stderr, .stderr").length,
    traceback: document.body.innerText.includes("Traceback"),
    rawTables: rawTables,
    splitSd: splitSd,
    sdCells: sdCells,
    height: Math.ceil(document.documentElement.scrollHeight),
  });
})()"""

# Screenshots stop at MAX_SHOT_HEIGHT pixels: the API page is ~140,000 pixels tall, and on a
# loaded 2-core machine a full capture of it outlasted the DevTools time limit.
SCREEN_WIDTH, SCREEN_HEIGHT, MAX_SHOT_HEIGHT = 1280, 900, 10000
# Seconds a page may take to render (generous: CI shares two cores with other test workers).
PAGE_TIMEOUT = 120


def _pages(site: Path) -> list[str]:
    """The docnames of the table of contents that the site has a page for."""
    toc = yaml.safe_load((REPO / "_toc.yml").read_text(encoding="utf-8"))
    return [name for name in build.toc_docnames(toc) if (site / f"{name}.html").is_file()]


def _evaluate(browser: DevTools, session: str, expression: str) -> str | None:
    """The value of ``expression`` in the page, or ``None`` while the page cannot answer (it is
    being replaced, or a busy machine keeps Chromium laying it out)."""
    try:
        result = browser.send(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True},
            session=session,
            timeout=PAGE_TIMEOUT,
        )
    except TimeoutError:
        return None
    return result["result"].get("value")


def _read_page(browser: DevTools, session: str, url: str, expect: dict) -> tuple[dict, list]:
    """Load ``url``; wait (at most PAGE_TIMEOUT s) until its images, formulas and widgets are
    rendered."""
    while not browser.events.empty():
        browser.events.get()
    browser.send("Page.navigate", {"url": url}, session=session, timeout=PAGE_TIMEOUT)
    state: dict = {}
    deadline = time.monotonic() + PAGE_TIMEOUT
    while time.monotonic() < deadline:
        time.sleep(0.5)
        value = _evaluate(browser, session, PAGE_STATE_JS)
        if value is None:
            continue
        state = json.loads(value)
        if state["url"] != url:  # still the previous page
            state = {}
            continue
        if state["ready"] == "complete":
            _evaluate(browser, session, MATHJAX_DONE_JS)
        if (
            state["ready"] == "complete"
            and state["imagesLoading"] == 0
            and state["mathJaxDone"]
            and state["sliders"] >= expect.get("sliders", 0)
        ):
            time.sleep(1.0)  # late requests (fonts) start, so they are recorded
            value = _evaluate(browser, session, PAGE_STATE_JS)
            state = json.loads(value) if value else state
            break
    events = []
    while not browser.events.empty():
        events.append(browser.events.get())
    return state, events


def _screenshot(browser: DevTools, session: str, height: int, path: Path) -> None:
    # A full page: the viewport is made as tall as the page (capped) and captured whole, then
    # restored. (A clip beyond the viewport came out shifted left: the theme's layout moves
    # when Chromium resizes the page for captureBeyondViewport.)
    tall = max(SCREEN_HEIGHT, min(height, MAX_SHOT_HEIGHT))
    metrics = {"width": SCREEN_WIDTH, "deviceScaleFactor": 1, "mobile": False}
    browser.send("Emulation.setDeviceMetricsOverride", {**metrics, "height": tall},
                 session=session)
    try:
        _evaluate(browser, session, "window.scrollTo(0, 0); true")
        shot = browser.send("Page.captureScreenshot", {"format": "png"}, session=session,
                            timeout=PAGE_TIMEOUT)
    finally:
        browser.send("Emulation.setDeviceMetricsOverride", {**metrics, "height": SCREEN_HEIGHT},
                     session=session)
    path.write_bytes(base64.b64decode(shot["data"]))


def test_smoke_book_pages_render_in_chromium(request, tmp_path):
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"{CHROMIUM} is absent (apt-get install chromium); .ci/run installs it")
    site = request.getfixturevalue("smoke_book")  # built only when Chromium is there
    pages = _pages(site)
    missing = [name for name in EXPECTED if name not in pages]
    assert not missing, f"the smoke book at {site} has no page for {missing}"
    expected = dict(EXPECTED)
    chapter5 = (site / "book" / "05_fusion_benchmarks.html").read_text("utf-8")
    if not re.search(r'(?<!")No Harvard folder', chapter5):  # printed (not in the code)
        expected.update(EXPECTED_WITH_PAIRS)  # the build was given the pairs

    shots = tmp_path / "screenshots"
    shots.mkdir()
    server = serve(site)
    host, port = server.server_address[:2]
    browser = DevTools(
        [*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"],
        tmp_path / "chromium.log",
    )
    states: dict[str, dict] = {}
    problems: list[str] = []
    try:
        session = browser.page_session()
        browser.send("Runtime.enable", session=session)  # a script's uncaught error: an event
        browser.send(
            "Emulation.setDeviceMetricsOverride",
            {
                "width": SCREEN_WIDTH,
                "height": SCREEN_HEIGHT,
                "deviceScaleFactor": 1,
                "mobile": False,
            },
            session=session,
        )
        for name in pages:
            url = f"http://{host}:{port}/{name}.html"
            expect = expected.get(name, {})
            state, events = _read_page(browser, session, url, expect)
            states[name] = state
            if not state:
                problems.append(f"{name}: the page did not render in {PAGE_TIMEOUT} s")
                continue
            try:
                _screenshot(browser, session, state["height"], shots / f"{Path(name).name}.png")
            except TimeoutError as err:  # a slow machine, not a defect of the page
                print(f"{name}: no screenshot ({err})")
            try:
                assert_offline(url, events)
            except AssertionError as err:
                problems.append(f"{name}: {err}")
            problems += [f"{name}: {error}" for error in page_errors(events)]
            problems += _page_problems(name, state, expect)
    finally:
        browser.close()
        server.shutdown()
        server.server_close()
        (tmp_path / "pages.json").write_text(json.dumps(states, indent=1), encoding="utf-8")
    assert not problems, (
        f"{len(problems)} problem(s) in the smoke book ({site}; screenshots and page counts in "
        f"{tmp_path}):\n" + "\n".join(problems)
    )


def page_errors(events: list) -> list[str]:
    """The page's uncaught JavaScript errors (DevTools ``Runtime.exceptionThrown``), one line
    each. A review found every page logging ``SyntaxError: Identifier 'THEBE_JS_URL' has
    already been declared``, a script Jupyter Book's setup put in twice (now dropped by
    ``book/_ext/unique_scripts.py``); nothing checked the console."""
    out = []
    for event in events:
        if event.get("method") == "Runtime.exceptionThrown":
            details = event["params"]["exceptionDetails"]
            text = (details.get("exception") or {}).get("description") or details.get("text")
            out.append(f"JavaScript error: {str(text).splitlines()[0]}")
    return out


def test_page_errors_reads_the_uncaught_exceptions():
    thrown = {"method": "Runtime.exceptionThrown", "params": {"exceptionDetails": {
        "text": "Uncaught", "exception": {"description": "SyntaxError: Identifier "
                                          "'THEBE_JS_URL' has already been declared\n  at x"}}}}
    other = {"method": "Network.requestWillBeSent", "params": {}}
    assert page_errors([other, thrown]) == [
        "JavaScript error: SyntaxError: Identifier 'THEBE_JS_URL' has already been declared"]
    assert page_errors([other]) == []


def _page_problems(name: str, state: dict, expect: dict) -> list[str]:
    """What is wrong with one page, as sentences naming the page."""
    out = []
    for what in ("tables", "images", "math"):
        if state[what] < expect.get(what, 0):
            out.append(f"{name}: {state[what]} {what}, expected at least {expect[what]}")
    for text in state["rawTables"]:
        out.append(f"{name}: a paragraph holds raw table markup: {text!r}")
    if state.get("sdCells", 0) < expect.get("sd_cells", 0):
        out.append(f"{name}: {state.get('sdCells', 0)} table cells with '± sd', expected at "
                   f"least {expect['sd_cells']}")
    if name.startswith("book/0"):  # a chapter's tables fit its column (the API page may not)
        for table in state.get("wideTables", []):
            out.append(f"{name}: a table is wider than the page: {table}")
        # and keep each sd with its ± (the records page shows RESULTS.md's own tables as they
        # are, hand-written ones included)
        for text in state.get("splitSd", []):
            out.append(f"{name}: a table cell breaks a '± sd' over two lines: {text!r}")
        for line in state.get("wideCode", []):
            out.append(f"{name}: code scrolls sideways, its longest line: {line}")
    if state["imagesLoading"] or state["imagesBroken"]:
        out.append(f"{name}: images not loaded: {state['imagesBroken'] or 'still loading'}")
    if state["rawMath"] or not state["mathJaxDone"]:
        out.append(f"{name}: {state['rawMath']} formula(s) left untypeset by MathJax")
    if expect.get("sliders"):
        if state["widgetStates"] < 1:
            out.append(f"{name}: no ipywidgets state embedded in the page")
        if state["sliders"] < expect["sliders"] or state["checkboxes"] < 1:
            out.append(
                f"{name}: the viewer's widgets did not render ({state['sliders']} sliders, "
                f"{state['checkboxes']} checkboxes)"
            )
        if state["widgetImages"] < 1:
            out.append(f"{name}: the viewer's figure is missing from the rendered widget")
    if state["errors"] or state["stderr"] or state["traceback"]:
        out.append(
            f"{name}: error output on the page ({state['errors']} error, {state['stderr']} "
            f"stderr outputs, 'Traceback' {'present' if state['traceback'] else 'absent'})"
        )
    return out
