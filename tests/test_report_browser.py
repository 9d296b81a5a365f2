"""The HTML reports in a real headless browser (Debian's chromium, see browser_check.py): the page loads
with no error, every image is drawn, and a screenshot is kept in runs/screenshots/ for a person to look
at. Skipped where the browser, its driver or selenium is absent."""

import shutil

import browser_check
import numpy as np
import pytest
from conftest import REPO
from PIL import Image

from kerastune_flow.search import compare as compare_lib

if browser_check.missing():
    pytest.skip(browser_check.missing(), allow_module_level=True)

SCREENSHOTS = REPO / "runs" / "screenshots"  # git-ignored; kept after the run for a person
# A 1x1 PNG, and a data URI that claims to be a PNG but is not one.
GOOD_PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR4nGP4z8DwHwAFAAH/iZk9HQAAAABJRU5ErkJggg=="
CORRUPT_PNG = "bm90IGEgcG5n"  # base64 of "not a png"


def _keep(screenshot, name):
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(screenshot, SCREENSHOTS / name)


def test_compare_report_renders_in_a_browser(image_folder, tmp_path):
    # One approach keeps the test near 5 s (a pair costs 10 s) and draws every kind of plot the report has.
    compare_lib.compare(str(image_folder), tmp_path / "cmp", approaches=("features",), preset="smoke", epochs=1)
    page = browser_check.check_page(tmp_path / "cmp" / "report.html", screenshot=tmp_path / "compare_report.png")
    _keep(page.screenshot, "compare_report.png")

    assert not page.problems(), page.problems()
    assert page.title == "kerastune_flow comparison"
    assert page.tables == 1
    # curves, accuracy against time, one confusion matrix per approach: all drawn
    assert len(page.images) >= 3 and all(width > 0 for _, _, width in page.images), page.images
    assert page.overflow_px == 0, f"the page is {page.overflow_px} px wider than the window"
    with Image.open(page.screenshot) as shot:
        assert shot.width >= browser_check.WINDOW_WIDTH and shot.height > 0
        pixels = np.asarray(shot.convert("L"))
    assert pixels.std() > 10  # something is drawn, not a blank page


def test_the_check_fails_on_a_broken_page(tmp_path):
    page_path = tmp_path / "broken.html"
    page_path.write_text(
        "<!DOCTYPE html><html><head><title>broken</title></head><body>"
        f"<img alt='good' src='data:image/png;base64,{GOOD_PNG}'>"
        f"<img alt='corrupt' src='data:image/png;base64,{CORRUPT_PNG}'>"
        "<img alt='missing' src='missing.png'>"
        "<script>throw new Error('boom in the report');</script>"
        "</body></html>"
    )
    page = browser_check.check_page(page_path, screenshot=tmp_path / "broken.png")

    broken = [src for src, _, _ in page.broken_images]  # sources cut to 40 characters
    assert len(broken) == 2 and broken[0] == f"data:image/png;base64,{CORRUPT_PNG}" and broken[1].startswith("file:")
    assert len(page.images) == 3 and page.images[0][2] == 1  # the good one is drawn, 1 px wide
    assert any("boom in the report" in message for message in page.console_errors), page.console_errors
    assert any("boom in the report" in message for message in page.page_errors), page.page_errors
    assert any("missing.png" in message for message in page.console_errors), page.console_errors
    problems = page.problems()
    assert sum("image not rendered" in p for p in problems) == 2, problems
    assert page.screenshot.is_file()


def test_a_page_with_no_image_is_a_problem():
    # A report whose plots all went missing is broken even when nothing else complains.
    page = browser_check.PageCheck(
        title="empty", console_errors=[], page_errors=[], images=[], tables=1, overflow_px=0, screenshot=None
    )
    assert page.problems() == ["the page has no image"]
