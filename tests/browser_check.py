"""Opens a local HTML page in a real headless browser and reports what a person would see.

The browser is Debian's `chromium`, driven through its own `/usr/bin/chromedriver` by selenium, so
nothing is downloaded at run time. Any report can be checked with one call::

    page = browser_check.check_page(run_dir / "report.html", screenshot=tmp_path / "report.png")
    assert not page.problems(), page.problems()

Tests skip themselves with `pytest.skip(browser_check.missing())` where the browser is absent.
"""

from __future__ import annotations

import base64
import dataclasses
import importlib.util
import json
import shutil
import sys
from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
WINDOW_WIDTH, WINDOW_HEIGHT = 1280, 900
PAGE_LOAD_SECONDS = 30
# Collected from the first script on: errors thrown outside the console's view are kept here too.
_RECORD_ERRORS = """
window.__pageErrors = [];
window.addEventListener('error', e => window.__pageErrors.push(
    e.message ? e.message : 'failed to load: ' + (e.target.currentSrc || e.target.src || e.target.href)
), true);
window.addEventListener('unhandledrejection', e => window.__pageErrors.push('unhandled rejection: ' + e.reason));
"""
_IMAGES = "return Array.from(document.images).map(i => [i.currentSrc.slice(0, 40), i.complete, i.naturalWidth]);"
_LAYOUT = """
const d = document.documentElement;
return {title: document.title, tables: document.querySelectorAll('table').length,
        scrollWidth: d.scrollWidth, clientWidth: d.clientWidth, errors: window.__pageErrors || []};
"""


def missing() -> str | None:
    """Why no page can be checked here, or None when the browser, its driver and selenium are all present."""
    if importlib.util.find_spec("selenium") is None:
        return "selenium is not installed (pip install -e '.[dev]')"
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not (path.is_file() or shutil.which(path.name)):
            return f"{path} is absent (apt-get install {package})"
    return None


@dataclasses.dataclass(frozen=True)
class PageCheck:
    """What the browser saw on one page.

    Attributes:
        title: the document's title.
        console_errors: the console's messages of level error (SEVERE): console.error calls,
            uncaught exceptions and resources that failed to load, as Chromium words them.
        page_errors: what the page's own listeners caught from its first script on: uncaught
            exceptions, rejected promises, and elements (an image, a script) that failed to load,
            a data URI that does not decode included.
        images: one `(source prefix, complete, naturalWidth)` triple per `<img>`, in page order.
        tables: how many `<table>` elements the page has.
        overflow_px: how far the page is wider than the window (0 when nothing sticks out sideways).
        screenshot: the full-page PNG, or None when none was asked for.
    """

    title: str
    console_errors: list[str]
    page_errors: list[str]
    images: list[tuple[str, bool, int]]
    tables: int
    overflow_px: int
    screenshot: Path | None

    @property
    def broken_images(self) -> list[tuple[str, bool, int]]:
        """The images that did not finish loading or did not decode to any pixels."""
        return [image for image in self.images if not (image[1] and image[2] > 0)]

    def problems(self) -> list[str]:
        """Everything a person would call broken: errors, no image at all, images not drawn."""
        found = [f"console: {message}" for message in self.console_errors]
        found += [f"page: {message}" for message in self.page_errors]
        if not self.images:
            found.append("the page has no image")
        found += [
            f"image not rendered: {src!r} complete={done} naturalWidth={width}"
            for src, done, width in self.broken_images
        ]
        return found


def _driver():
    # Imported here, not at the top: selenium is an optional (dev) dependency and the tests that need
    # it skip where it is missing.
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM if CHROMIUM.is_file() else shutil.which(CHROMIUM.name))
    for flag in (
        "--headless=new",
        "--no-sandbox",  # the tests run as root, where Chromium's sandbox refuses to start
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-extensions",
        "--no-first-run",
        "--hide-scrollbars",  # the screenshot shows the page, not a scroll bar
        f"--window-size={WINDOW_WIDTH},{WINDOW_HEIGHT}",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # An explicit driver path: selenium-manager is never asked, so nothing goes to the network.
    service = Service(str(CHROMEDRIVER if CHROMEDRIVER.is_file() else shutil.which(CHROMEDRIVER.name)))
    return webdriver.Chrome(options=options, service=service)


def _full_page_png(driver) -> bytes:
    size = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
    clip = {"x": 0, "y": 0, "width": max(size["width"], WINDOW_WIDTH), "height": size["height"], "scale": 1}
    shot = driver.execute_cdp_cmd(
        "Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True, "clip": clip}
    )
    return base64.b64decode(shot["data"])


def check_page(path: str | Path, *, screenshot: str | Path | None = None) -> PageCheck:
    """Loads a local HTML file in headless Chromium and reports its errors, images and layout.

    Args:
        path: the HTML file.
        screenshot: where to save a full-page PNG screenshot; None for none.

    Returns:
        A `PageCheck`; its `problems()` is empty for a page that loaded cleanly with every image drawn.

    Raises:
        FileNotFoundError: when `path` is not a file.
    """
    path = Path(path).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"No page to check. Received: path={path}")
    driver = _driver()
    try:
        driver.set_page_load_timeout(PAGE_LOAD_SECONDS)
        driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": _RECORD_ERRORS})
        driver.get(path.as_uri())  # returns after the load event: every image has loaded or failed
        # Decoding can lag the load event; wait for it so that naturalWidth is final.
        driver.execute_async_script(
            "const done = arguments[arguments.length - 1];"
            "Promise.all(Array.from(document.images).map(i => i.decode().catch(() => null))).then(() => done());"
        )
        images = [(str(src), bool(done), int(width)) for src, done, width in driver.execute_script(_IMAGES)]
        layout = driver.execute_script(_LAYOUT)
        console = [entry["message"] for entry in driver.get_log("browser") if entry["level"] in ("SEVERE", "ERROR")]
        saved = None
        if screenshot is not None:
            saved = Path(screenshot)
            saved.parent.mkdir(parents=True, exist_ok=True)
            saved.write_bytes(_full_page_png(driver))
    finally:
        driver.quit()
    return PageCheck(
        title=layout["title"],
        console_errors=console,
        page_errors=[str(message) for message in layout["errors"]],
        images=images,
        tables=int(layout["tables"]),
        overflow_px=max(0, int(layout["scrollWidth"]) - int(layout["clientWidth"])),
        screenshot=saved,
    )


if __name__ == "__main__":  # a quick look at any page: python tests/browser_check.py PAGE [PNG]
    result = check_page(sys.argv[1], screenshot=sys.argv[2] if len(sys.argv) > 2 else None)
    print(
        json.dumps(
            {**dataclasses.asdict(result), "screenshot": str(result.screenshot), "problems": result.problems()},
            indent=1,
        )
    )
