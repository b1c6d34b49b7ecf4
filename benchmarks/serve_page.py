"""How fast `lora-plan serve` answers a change in a browser, and the README's screenshot of it.

Starts the real command (`lora-plan serve --port 0`, a fresh process), opens the page in headless
Chromium (Debian's `chromium`, driven by Playwright), changes one field at a time and times each
change until the bars are redrawn with the planner's answer, the page's debounce included.
Target: every redraw under 1 s.

    python benchmarks/serve_page.py                         # times 12 changes
    python benchmarks/serve_page.py --screenshot docs/serve.png

Prints each change's seconds and the slowest; exits 1 when the slowest is over the target. With
--screenshot it also writes, beside the PNG (`docs/serve.json`), the query it shows and the figures
the page drew for it (command line, headline, each bar's bytes, the table's cells, the notes) and
the PNG's SHA-256: `tests/test_serve.py` checks those figures against the CLI of today and
`tests/test_serve_browser.py` against the page of today, so a screenshot of an older plan fails.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.browser import ARGS, chromium_path, page_figures  # noqa: E402

# The page the README shows: Llama-3.1-8B, LoRA against QLoRA on a 24 GB card.
SHOWN = ("model=llama-3.1-8b&method=lora,qlora&rank=16,64&batch-size=2&grad-checkpointing=on"
         "&gpu=RTX-4090-24GB")
CHANGES = [("#f-batch-size", "fill", v) for v in ("1", "2", "4", "8")] + \
          [("#f-seq-len", "fill", v) for v in ("1024", "4096")] + \
          [("#f-precision", "select", v) for v in ("bf16", "mixed")] + \
          [("#f-rank", "fill", v) for v in ("8", "16,64")] + \
          [("#f-gpu", "fill", v) for v in ("A100-40GB", "RTX-4090-24GB")]


def start_server() -> tuple[subprocess.Popen, str]:
    script = Path(sys.executable).with_name("lora-plan")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "lora_planner"]
    process = subprocess.Popen([*command, "serve", "--port", "0"], stdout=subprocess.PIPE, text=True)
    line = process.stdout.readline()  # "lora-plan serving http://127.0.0.1:PORT/  (Ctrl+C to stop)"
    return process, line.split()[2]


def write_screenshot(page, path: Path) -> None:
    """The PNG and, beside it, its record (`.json`): the query and the figures the page shows.
    Each is written to a temporary name and renamed into place."""
    png = page.screenshot(full_page=True)
    record = {"query": SHOWN, **page_figures(page), "png_sha256": hashlib.sha256(png).hexdigest()}
    for target, data in [(path, png), (path.with_suffix(".json"),
                                       (json.dumps(record, indent=1) + "\n").encode())]:
        part = target.with_name(f".{target.name}.part")
        part.write_bytes(data)
        os.replace(part, target)
        print(f"wrote {target}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--screenshot", type=Path, help="Write a PNG of the page here.")
    parser.add_argument("--target", type=float, default=1.0, help="Seconds a redraw may take.")
    args = parser.parse_args()

    from playwright.sync_api import sync_playwright

    process, url = start_server()
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium_path(), args=ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 940}, device_scale_factor=1)
            page.goto(f"{url}?{SHOWN}")
            page.wait_for_function("document.body.dataset.state === 'ready'")
            times = []
            for selector, how, value in CHANGES:
                before = page.evaluate("document.body.dataset.answers")
                start = time.perf_counter()
                page.fill(selector, value) if how == "fill" else page.select_option(selector, value)
                page.wait_for_function(
                    "(n) => document.body.dataset.answers !== n && document.body.dataset.state !== 'loading'",
                    arg=before)
                times.append(time.perf_counter() - start)
                print(f"{selector} -> {value}: {times[-1]:.3f} s")
            print(f"median {statistics.median(times):.3f} s, slowest {max(times):.3f} s "
                  f"(target {args.target} s)")
            if args.screenshot:
                page.goto(f"{url}?{SHOWN}")
                page.wait_for_function("document.body.dataset.state === 'ready'")
                write_screenshot(page, args.screenshot)
            browser.close()
    finally:
        process.terminate()
        process.wait()
    return 0 if max(times) <= args.target else 1


if __name__ == "__main__":
    sys.exit(main())
