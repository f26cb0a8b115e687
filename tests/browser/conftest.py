"""Browser tests: real Chromium (Debian's /usr/bin/chromium, driven by Playwright for Python) against a real
gateway process (`cdc-dashboard serve --with-listener`) on a real PostgreSQL.

Tests marked `browser` skip, with that reason, only when /usr/bin/chromium is absent; `.ci/run` installs it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, sync_playwright

from .harness import CHROMIUM, CHROMIUM_ARGS, Gateway


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "browser" in item.keywords and not CHROMIUM.exists():
            item.add_marker(
                pytest.mark.skip(reason=f"{CHROMIUM} is absent (apt-get install chromium; .ci/run installs it)")
            )


@pytest.fixture
def gateway(db_url: str, tmp_path: Path) -> Iterator[Gateway]:
    gw = Gateway(db_url, tmp_path / "gateway.log")
    gw.start()
    try:
        yield gw
    finally:
        gw.stop()


@pytest.fixture(scope="module")
def chromium() -> Iterator[Browser]:
    """One headless Chromium per module (a few hundred ms to start; pages are cheap)."""
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()
