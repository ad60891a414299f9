"""A real browser for the pages' tests: Debian's headless `chromium`, driven by Playwright.

`scripts/install.sh test` installs the `chromium` package; Playwright drives that binary
(`executable_path`), so no browser is downloaded. The orchestrator's certificate comes from
the swarm's private CA, which this throwaway browser profile does not hold: certificate
errors are ignored for the test's own origin only in effect, as nothing else is visited.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager

from playwright.sync_api import BrowserContext, sync_playwright


def chromium_path() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        raise RuntimeError("no chromium on PATH: run 'bash scripts/install.sh test'")
    return path


@contextmanager
def browser_context() -> Iterator[BrowserContext]:
    """A fresh headless Chromium profile (no cookies shared with another test)."""
    args = ["--no-sandbox"] if os.geteuid() == 0 else []  # Chromium's sandbox refuses to run as root
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium_path(), args=args, headless=True)
        try:
            context = browser.new_context(ignore_https_errors=True, viewport={"width": 1400, "height": 900})
            try:
                yield context
            finally:
                context.close()
        finally:
            browser.close()
