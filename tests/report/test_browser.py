"""The report in a real headless browser (Debian's chromium driven by Playwright): it opens
with the network cut off, draws its curves, shows the findings and the record, and logs no
console error. ``STOKER_UPDATE_SCREENSHOT=1`` also saves the screenshot shown in the README
(docs/report.png).

No browser is a failure, never a skip: install it with ``apt-get install -y chromium``
(.ci/run does) or point ``$STOKER_CHROMIUM`` at one.
"""

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from stoker.report import write_report

DOCS = Path(__file__).resolve().parents[2] / "docs"
CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/lib/chromium/chromium")


def _chromium() -> str:
    wanted = os.environ.get("STOKER_CHROMIUM")
    found = [wanted] if wanted else []
    found += [p for p in (shutil.which("chromium"), shutil.which("chromium-browser")) if p]
    found += list(CANDIDATES)
    for path in found:
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    pytest.fail(
        "no chromium found (looked at $STOKER_CHROMIUM, chromium and chromium-browser on PATH, "
        f"{', '.join(CANDIDATES)}); the report's browser test needs one: "
        "`apt-get install -y chromium` (as .ci/run does) or set STOKER_CHROMIUM=/path/to/it",
        pytrace=False,
    )


@pytest.fixture(scope="module")
def browser():
    executable = _chromium()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail(
            "playwright is not installed; `pip install -e .[test]` installs it (it drives the "
            "system chromium, no browser download)",
            pytrace=False,
        )
    with sync_playwright() as p:
        # Every host name resolves to nothing: even a request that slipped past the route
        # below could not leave the machine.
        b = p.chromium.launch(
            executable_path=executable, args=["--host-resolver-rules=MAP * ~NOTFOUND"]
        )
        yield b
        b.close()


def _open(browser, path: Path):
    """The page at ``path`` with every non-file request aborted; (page, requests, errors)."""
    context = browser.new_context(viewport={"width": 1200, "height": 1000}, offline=True)
    page = context.new_page()
    requests, errors = [], []
    page.on("request", lambda r: requests.append(r.url))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.route(
        "**/*",
        lambda route: (
            route.continue_() if route.request.url.startswith("file://") else route.abort()
        ),
    )
    page.goto(path.resolve().as_uri(), wait_until="load")
    return page, requests, errors


def test_report_opens_offline_and_shows_everything(browser, real_runs, tmp_path):
    a, b = real_runs
    report = write_report([a, b], tmp_path / "report.html")
    page, requests, errors = _open(browser, report)
    try:
        assert requests and all(url.startswith("file://") for url in requests), requests
        # The curves are drawn: path elements with points, laid out with a real size.
        curves = page.locator("svg.chart path.curve")
        assert curves.count() >= 10
        lengths = curves.evaluate_all("ps => ps.map(p => p.getTotalLength())")
        assert sum(x > 50 for x in lengths) >= 8, lengths
        points = curves.evaluate_all("ps => ps.map(p => p.getAttribute('d').split('L').length)")
        assert max(points) >= 20
        box = curves.first.bounding_box()
        assert box is not None and box["width"] > 200 and box["height"] > 20
        # Checkpoints and the resume on the timeline, the doctor's findings, the record.
        assert page.locator("svg.chart line.marker.resume").count() >= 1
        for text in (
            "What differs",
            "attempt 2 resumed from step 20",
            "where the step goes",
            "host-sync",
            "loss.item() makes the host wait",
            "stoker.backward(loss)",
        ):
            assert _visible(page, text), text
        record = page.locator("#record ~ table").first
        assert record.is_visible() and "tiny_job.py --doctor --die-at 25" in record.inner_text()
        assert page.locator("pre.diff .add").first.is_visible()  # b's code edit
        page.wait_for_timeout(100)  # let any late console error arrive
        assert errors == [], errors
        shot = page.screenshot(full_page=True)
        assert len(shot) > 50_000
        if os.environ.get("STOKER_UPDATE_SCREENSHOT") == "1":
            page.screenshot(path=str(DOCS / "report.png"), clip=_clip(page), full_page=True)
    finally:
        page.context.close()


def _visible(page, text):
    """Whether ``text`` is in a visible element of the page (an SVG ``<title>`` tooltip
    holding the same words does not count)."""
    found = page.locator("main :is(td, p, pre, h2, h3, figcaption)").filter(has_text=text)
    return any(found.nth(i).is_visible() for i in range(found.count()))


def _clip(page):
    """Summary and the first curves: from the top to the end of the loss charts."""
    bottom = page.locator("#m-lr").bounding_box()
    return {"x": 0, "y": 0, "width": 1200, "height": bottom["y"] if bottom else 1400}


def test_compression_section_is_drawn(browser, tmp_path):
    from stoker.records import RecordConfig, start_run

    run = start_run(RecordConfig(directory=tmp_path / "run", save_code=False))
    run.finish()
    (run.dir / "compressed").mkdir()
    forms = [("fp32", 0.41, 8.0), ("bf16", 0.40, 5.0), ("ffn-50% + int8-static", 0.38, 2.5)]
    rows = [
        {
            "name": name,
            "file_bytes": 4e6,
            "nonzero_params": 5e5,
            "latency_ms": {"1": {"median": ms}, "32": {"median": 10 * ms}},
            "tokens_per_second": 1e4,
            "accuracy": accuracy,
            "perplexity": 20.0,
        }
        for name, accuracy, ms in forms
    ]
    (run.dir / "compressed" / "x.json").write_text(json.dumps(rows))
    page, requests, errors = _open(browser, write_report([run.dir], tmp_path / "c.html"))
    try:
        assert _visible(page, "ffn-50% + int8-static") and _visible(page, "38.0%")
        chart = page.locator("#compression ~ svg.chart").first
        box = chart.bounding_box()
        assert box is not None and box["width"] > 200 and box["height"] > 20
        assert chart.locator("circle").count() == 3  # one dot per form
        page.wait_for_timeout(100)
        assert errors == [] and all(url.startswith("file://") for url in requests), errors
    finally:
        page.context.close()


def test_hostile_report_runs_nothing(browser, hostile_run, tmp_path):
    report = write_report([hostile_run], tmp_path / "hostile.html")
    page, requests, errors = _open(browser, report)
    try:
        dialogs = []
        page.on("dialog", lambda d: dialogs.append(d.message))
        page.wait_for_timeout(200)
        assert page.locator("script, img, iframe").count() == 0
        assert all(url.startswith("file://") for url in requests), requests
        assert dialogs == [] and errors == [], (dialogs, errors)
        assert _visible(page, '<script>alert("x")</script>')
    finally:
        page.context.close()


def test_no_chromium_is_a_failure_that_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setenv("STOKER_CHROMIUM", str(tmp_path / "missing"))
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(sys.modules[__name__], "CANDIDATES", (str(tmp_path / "chromium"),))
    with pytest.raises(pytest.fail.Exception, match=r"apt-get install -y chromium"):
        _chromium()
