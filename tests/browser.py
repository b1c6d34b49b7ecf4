"""Headless Chromium for the `serve` page: Debian's `chromium` driven by Playwright's Python API.

No browser is downloaded: Playwright launches the system's binary (`LORA_PLAN_CHROMIUM`, else
`chromium` on PATH). Without one, or without the playwright package, `browser_or_skip` skips.
"""

from __future__ import annotations

import os
import shutil
import threading
from contextlib import contextmanager
from pathlib import Path

import pytest

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium_path() -> str | None:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    return os.environ.get("LORA_PLAN_CHROMIUM") or found


def _missing(why: str) -> None:
    """Skip, unless LORA_PLAN_REQUIRE_BROWSER is set (CI sets it): there a missing browser fails."""
    if os.environ.get("LORA_PLAN_REQUIRE_BROWSER"):
        pytest.fail(f"browser tests required, but {why}")
    pytest.skip(why)


def browser_or_skip():
    """A started Playwright and a launched Chromium, or a pytest skip saying what is missing."""
    path = chromium_path()
    if path is None:
        _missing("no chromium on PATH (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("no playwright (pip install playwright)")
    playwright = sync_playwright().start()
    return playwright, playwright.chromium.launch(executable_path=path, args=ARGS)


@contextmanager
def serving(upload_dir: Path):
    """`lora-plan serve` in a thread on a free loopback port; yields its base URL."""
    from lora_planner.cli.serve import make_server

    server = make_server("127.0.0.1", 0, upload_dir=upload_dir)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


# What the page shows, read off the page: the command line, the headline, each plan's bars (the
# bytes each stands for), the summary table's cells and the notes. The screenshot's record
# (docs/serve.json) holds this, and a test compares it with the page and the CLI of today.
FIGURES_JS = """() => ({
  command: document.getElementById('command').textContent,
  headline: document.getElementById('headline').textContent,
  bars: [...document.querySelectorAll('#chart g.plan')].map((g) => ({
    label: g.dataset.label,
    bytes: Object.fromEntries([...g.querySelectorAll('rect.seg')].map(
      (r) => [r.dataset.term, Number(r.dataset.bytes)])),
  })),
  summary: [...document.querySelectorAll('#summary tr')].map(
    (tr) => [...tr.children].map((cell) => cell.textContent)),
  notes: [...document.querySelectorAll('#notes li')].map((li) => li.textContent),
})"""


def page_figures(page) -> dict:
    """The figures the page shows now (see FIGURES_JS)."""
    return page.evaluate(FIGURES_JS)
