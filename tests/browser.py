"""Headless Chromium for the tests that check what a person sees (HTML reports, TensorBoard).

Debian's ``chromium`` and ``chromium-driver`` packages driven through Selenium.  ``.ci/run``
installs both and sets ``GRADSCOPE_REQUIRE_BROWSER=1``, so in CI a missing browser is a failure;
elsewhere (a laptop, the README's fresh venv) the browser tests skip with the reason.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


def _why_unavailable() -> str | None:
    if CHROMIUM is None or CHROMEDRIVER is None:
        return "headless Chromium needs Debian's chromium and chromium-driver packages"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "headless Chromium tests need selenium (pip install -e '.[browser]')"
    return None


WHY_NO_BROWSER = _why_unavailable()
if WHY_NO_BROWSER and os.environ.get("GRADSCOPE_REQUIRE_BROWSER") == "1":
    raise RuntimeError(f"GRADSCOPE_REQUIRE_BROWSER=1 but {WHY_NO_BROWSER}")

requires_chromium = pytest.mark.skipif(WHY_NO_BROWSER is not None, reason=WHY_NO_BROWSER or "")


@contextmanager
def headless_chromium(width: int = 1400, height: int = 1000) -> Iterator[Any]:
    """A Selenium driver on a fresh headless Chromium profile, quit on exit.

    The flags keep Chromium off the network (this machine's network is closed: without them it
    tries Google's hosts at every start) and let it run as root in a container.
    """
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="gradscope-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM or ""
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        f"--window-size={width},{height}",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER or ""), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def console_errors(driver: Any) -> list[str]:
    """The page's console messages at level SEVERE (errors, failed loads) since the last call."""
    return [entry["message"] for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
