"""index.html in a real browser: after `featbench experiment=smoke`, headless Chromium (Debian's
`chromium` package, driven through the `playwright` package's Python API; never
`playwright install`, which downloads browsers) opens the page from the file system.

It must load without a console error and without a single network request, show the
headline table and feature cards with shaded tokens, and open a permalink; the screenshot
of that feature card must not be blank. Without Chromium (or playwright) the test is
skipped with its reason, except under CI (the `CI` variable set), where it fails: .ci/run
installs Chromium. Set FEATBENCH_SCREENSHOT=docs/img/browser.png to keep the screenshot.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import featbench_cmd

pytestmark = pytest.mark.integration

ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
VIEWPORT = {"width": 1280, "height": 900}


def _missing(what: str) -> None:
    """Fail under CI, else skip, for a missing browser or driver."""
    if os.environ.get("CI"):
        pytest.fail(f"{what} is missing; CI must install it (.ci/run)")
    pytest.skip(f"{what} is not installed; the browser test needs it (CI fails instead)")


@pytest.fixture(scope="module")
def chromium() -> str:
    """Debian's Chromium, and the playwright package to drive it (checked before the run)."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        _missing("Chromium (Debian: apt-get install -y chromium)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        _missing("The playwright package (pip install -e '.[dev]')")
    return str(found)


@pytest.fixture(scope="module")
def smoke_page(chromium, tmp_path_factory) -> Path:
    """index.html of a real smoke run (the embedded model, the offline judge)."""
    tmp = tmp_path_factory.mktemp("browser")
    out = subprocess.run(
        featbench_cmd() + ["experiment=smoke", "logger=none", f"paths.results_dir={tmp / 'res'}"],
        cwd=tmp,
        env={**os.environ, "HYDRA_FULL_ERROR": "0"},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    [page] = list((tmp / "res").rglob("index.html"))
    return page


def test_the_smoke_report_page_renders_offline_in_chromium(chromium, smoke_page):
    from playwright.sync_api import sync_playwright

    url = smoke_page.resolve().as_uri()
    errors, requests = [], []
    with sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=chromium, args=ARGS)
        try:
            context = browser.new_context(viewport=VIEWPORT)
            context.on("request", lambda r: requests.append(r.url))
            page = context.new_page()
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda err: errors.append(str(err)))
            page.goto(url, wait_until="load")
            assert page.locator("table.headline").count() >= 1
            assert page.locator("table.headline tbody tr").first.is_visible()
            cards = page.locator("article.card:not([hidden])")
            assert cards.count() >= 1 and cards.first.is_visible()
            assert page.locator("article.card span.tok.top").count() >= 1  # shaded tokens
            target = cards.first.get_attribute("id")
            page.goto(f"{url}#{target}")  # a permalink opens and marks its card
            page.wait_for_function(
                f"document.getElementById({target!r}).classList.contains('focus')"
            )
            shot = page.screenshot()  # the card, its contexts and samples
        finally:
            browser.close()
    assert not errors, errors
    others = [u for u in requests if u.split("#")[0] != url and not u.startswith("data:")]
    assert not others, f"the page made network requests: {others}"
    with Image.open(io.BytesIO(shot)) as image:
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is None or len(colours) > 10, "the screenshot is blank"
    keep = os.environ.get("FEATBENCH_SCREENSHOT")
    if keep:
        Path(keep).write_bytes(shot)
