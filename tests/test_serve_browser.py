"""The `serve` page in a real browser (headless Chromium): what it draws is the planner's JSON.

Every expected number comes from the CLI run through CliRunner with an argv written here, never
from the page's or the server's own code. Skipped without chromium or playwright; `.ci/run`
installs both.
"""

from __future__ import annotations

import json
import shlex
import time

import pytest
from click.testing import CliRunner

from lora_planner.cli import main

from .browser import browser_or_skip, serving

pytestmark = pytest.mark.browser


def cli(argv: list[str]):
    return CliRunner().invoke(main, argv)


def cli_json(argv: list[str]) -> dict:
    result = cli([*argv, "--format", "json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


@pytest.fixture(scope="module")
def browser():
    playwright, chromium = browser_or_skip()
    yield chromium
    chromium.close()
    playwright.stop()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    with serving(tmp_path_factory.mktemp("uploads")) as url:
        yield url


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    context.close()
    assert not errors, errors  # no script error on the way


def settle(page, expect_in_command: str = "", state: str = "ready") -> None:
    """Wait until the page has drawn an answer whose command line holds `expect_in_command`."""
    page.wait_for_function(
        "([text, state]) => document.body.dataset.state === state"
        " && document.getElementById('command').textContent.includes(text)",
        arg=[expect_in_command, state], timeout=30_000)


def bars(page) -> list[dict]:
    """Each plan's drawn bars: label and, per term, the bytes it stands for and its height in px."""
    return page.evaluate("""() => {
        const svg = document.querySelector('#chart svg');
        const px = Number(svg.dataset.pxPerByte);
        return [...svg.querySelectorAll('g.plan')].map((g) => ({
            label: g.dataset.label,
            terms: Object.fromEntries([...g.querySelectorAll('rect.seg')].map((r) => [r.dataset.term,
                {bytes: Number(r.dataset.bytes), height: Number(r.getAttribute('height')), px}])),
        }));
    }""")


def assert_drawn(page, expected: dict) -> None:
    """The bars show the CLI's numbers, one group per plan, each bar as tall as its bytes."""
    drawn = bars(page)
    labels = [p["method"] if p["rank"] is None else f"{p['method']} r={p['rank']}" for p in expected["plans"]]
    assert [d["label"] for d in drawn] == labels
    for d, p in zip(drawn, expected["plans"], strict=True):
        want = dict(p["memory_bytes"])  # every term, a zero one as a bar of no height
        if p["device_overhead_bytes"]:
            want["device_overhead"] = p["device_overhead_bytes"]
        assert {k: v["bytes"] for k, v in d["terms"].items()} == want
        for term in d["terms"].values():
            assert term["height"] == pytest.approx(term["bytes"] * term["px"], rel=1e-9, abs=1e-6)
    capacity = page.get_attribute("#chart line.capacity", "data-bytes")
    assert int(capacity) == expected["gpu"]["memory_bytes"]


def test_changing_a_field_redraws_the_bars_with_the_planners_numbers(page, base):
    settings = {"--model": "gpt2", "--method": "lora,qlora", "--rank": "4"}

    def argv() -> list[str]:
        return [a for option, value in settings.items() for a in (option, value) if a is not None]

    page.goto(f"{base}/?model=gpt2&method=lora,qlora&rank=4")
    settle(page, "--rank 4")
    assert_drawn(page, cli_json(argv()))

    timings = []
    for action, option, value in [
        (lambda: page.fill("#f-batch-size", "4"), "--batch-size", "4"),
        (lambda: page.select_option("#f-precision", "bf16"), "--precision", "bf16"),
        (lambda: page.check("#f-grad-checkpointing"), "--grad-checkpointing", None),
        (lambda: page.fill("#f-rank", "16,64"), "--rank", "16,64"),
        (lambda: page.fill("#f-gpu", "RTX-4090-24GB"), "--gpu", "RTX-4090-24GB"),
    ]:
        start = time.perf_counter()
        action()
        settle(page, option if value is None else f"{option} {value}")
        timings.append(time.perf_counter() - start)
        settings[option] = value
        expected = cli_json(argv())
        assert_drawn(page, expected)
        # the command line the page shows is a working one, and plans the same
        assert cli_json(shlex.split(page.text_content("#command"))[1:]) == expected
    # "answers within a second of a change", the page's pause for typing included: the median
    # change (one slow outlier on a crowded machine is not the page); none near several seconds
    assert sorted(timings)[len(timings) // 2] < 1.0 and max(timings) < 3.0, timings


def test_the_link_reproduces_the_plan(page, base, browser):
    page.goto(f"{base}/?model=llama-3.2-1b&method=qlora")
    settle(page, "--method qlora")
    page.fill("#f-seq-len", "4096")
    page.select_option("#f-attention", "eager")
    page.uncheck("#f-double-quant")
    settle(page, "--no-double-quant")
    link = page.get_attribute("#link", "href")
    assert link == page.url
    first = (bars(page), page.text_content("#command"), page.text_content("#summary"))

    other = browser.new_context().new_page()
    other.goto(link)
    settle(other, "--no-double-quant")
    again = (bars(other), other.text_content("#command"), other.text_content("#summary"))
    assert again == first
    assert other.input_value("#f-seq-len") == "4096" and other.input_value("#f-attention") == "eager"
    assert not other.is_checked("#f-double-quant")
    assert_drawn(other, cli_json(["--model", "llama-3.2-1b", "--method", "qlora", "--seq-len", "4096",
                                  "--attention", "eager", "--no-double-quant"]))
    other.context.close()


@pytest.mark.parametrize("content", [b'{"model_type": "bert", "hidden_size": 8}',
                                     b'{"model_type": "llama", "hidden_size": 64}'])
def test_a_bad_config_upload_shows_its_message(page, base, tmp_path, content):
    page.goto(f"{base}/?model=gpt2&method=lora")
    settle(page, "--model gpt2")
    page.set_input_files("#upload", files=[{"name": "config.json", "mimeType": "application/json",
                                             "buffer": content}])
    page.wait_for_selector("#error", state="visible")
    (tmp_path / "config.json").write_bytes(content)
    result = cli(["--model", str(tmp_path / "config.json")])
    assert result.exit_code == 2
    # where the message names the file, it names it as uploaded
    expected = result.output.strip().splitlines()[-1].replace(str(tmp_path / "config.json"), "config.json")
    assert page.text_content("#error") == expected
    assert page.get_attribute("body", "data-state") == "error"


def test_a_config_upload_is_planned_like_the_file(page, base, tmp_path):
    from lora_planner.catalog import CATALOG
    from lora_planner.spec import to_hf_config

    config = {**to_hf_config(next(s for s in CATALOG if s.family == "qwen2")), "num_hidden_layers": 4}
    data = json.dumps(config).encode()
    page.goto(f"{base}/?model=gpt2&method=lora")
    settle(page, "--model gpt2")
    page.set_input_files("#upload", files=[{"name": "my-qwen.json", "mimeType": "application/json",
                                             "buffer": data}])
    settle(page, "my-qwen")
    assert page.is_hidden("#error")
    (tmp_path / "my-qwen").mkdir()
    (tmp_path / "my-qwen" / "config.json").write_bytes(data)
    assert_drawn(page, cli_json(["--model", str(tmp_path / "my-qwen"), "--method", "lora"]))


def test_bad_input_shows_the_cli_error_line(page, base):
    page.goto(f"{base}/?model=gpt2&method=lora")
    settle(page, "--model gpt2")
    page.fill("#f-rank", "eight")
    settle(page, "--rank eight", state="error")
    assert page.text_content("#error") == cli(["--model", "gpt2", "--method", "lora", "--rank", "eight"]
                                              ).output.strip().splitlines()[-1]
    page.fill("#f-rank", "8")  # fixed: the message goes, the bars come back
    settle(page, "--rank 8")
    assert page.is_hidden("#error")


def test_explain_on_demand(page, base):
    page.goto(f"{base}/?model=gpt2&method=lora")
    settle(page, "--model gpt2")
    page.click("#explain-box summary")
    assert page.evaluate("document.getElementById('explain-box').open")
    expected = cli(["--model", "gpt2", "--method", "lora", "--explain"]).output
    try:
        page.wait_for_function("(t) => document.getElementById('explain').textContent === t", arg=expected,
                               timeout=15_000)
    except Exception:  # say what the page shows instead
        assert page.text_content("#explain") == expected
        raise


def test_a_slow_plan_shows_progress(page, base, monkeypatch):
    """While the planner works (here made to take 1.2 s), the page counts the seconds."""
    from lora_planner.cli import serve

    run_plan = serve.PlanServer.run_plan

    def slow(self, argv, heavy, wait):
        if any(a.startswith("--seq-len") for a in argv):
            time.sleep(1.2)
        return run_plan(self, argv, heavy, wait)

    page.goto(f"{base}/?model=gpt2&method=lora")
    settle(page, "--model gpt2")
    monkeypatch.setattr(serve.PlanServer, "run_plan", slow)
    page.fill("#f-seq-len", "512")
    page.wait_for_function("/planning… [0-9.]+ s/.test(document.getElementById('status').textContent)"
                           " && document.body.dataset.state === 'loading'")
    settle(page, "--seq-len 512")
    assert page.text_content("#status") == ""


def test_a_link_with_a_bad_value_shows_the_cli_error_until_fixed(page, base):
    page.goto(f"{base}/?model=gpt2&method=lora&precision=fp8&batch-size=two")
    settle(page, "--precision fp8", state="error")
    result = cli(["--model", "gpt2", "--method", "lora", "--batch-size", "two", "--precision", "fp8"])
    assert page.text_content("#error") == result.output.strip().splitlines()[-1]
    page.fill("#f-batch-size", "2")
    page.select_option("#f-precision", "bf16")
    settle(page, "--precision bf16")
    assert_drawn(page, cli_json(["--model", "gpt2", "--method", "lora", "--batch-size", "2",
                                 "--precision", "bf16"]))


def test_an_option_added_to_plan_appears_on_the_page(page, base, monkeypatch):
    """The form is the click command's options: one added to `plan` shows up, with its choices,
    under "More options", and a link setting it opens that section."""
    import click

    from lora_planner.cli.commands import plan_command

    extra = click.Option(["--kernel-flavour"], type=click.Choice(["plain", "fused"]), default="plain",
                         help="An option this test adds.")
    monkeypatch.setattr(plan_command, "params", [*plan_command.params, extra])
    page.goto(f"{base}/?model=gpt2&method=lora&kernel-flavour=fused")
    page.wait_for_selector("details.more[open] #f-kernel-flavour")
    assert page.eval_on_selector_all("#f-kernel-flavour option", "os => os.map((o) => o.value)") == [
        "plain", "fused"]
    assert page.input_value("#f-kernel-flavour") == "fused"


@pytest.mark.parametrize("query, argv", [
    ("params=70e9&method=full&precision=bf16&gpu-mem=80GB",  # no shapes: no phase, no activations
     ["--params", "70e9", "--method", "full", "--precision", "bf16", "--gpu-mem", "80GB"]),
    ("model=1b&method=full,qlora&num-gpus=8&sharding=zero3&tokens=1e9&fit=on&units=GiB",
     ["--model", "1b", "--method", "full,qlora", "--num-gpus", "8", "--sharding", "zero3", "--tokens", "1e9",
      "--fit", "--units", "GiB"]),
])
def test_other_shapes_of_plan_are_drawn(page, base, query, argv):
    page.goto(f"{base}/?{query}")
    page.wait_for_function("document.body.dataset.state === 'ready'", timeout=60_000)  # --fit searches
    assert_drawn(page, cli_json(argv))


def test_the_screenshot_is_the_page_of_today(page, base):
    """docs/serve.png's record (docs/serve.json) holds every figure the page showed when it was
    taken: the page of today, at the same query, shows the same ones: the table's cells as
    formatted, the headline and the notes as well as the bars. When this fails, regenerate it:
    `.venv/bin/python benchmarks/serve_page.py --screenshot docs/serve.png`."""
    from pathlib import Path

    from .browser import page_figures

    record = json.loads((Path(__file__).resolve().parents[1] / "docs" / "serve.json").read_text())
    page.set_viewport_size({"width": 1280, "height": 940})  # as the benchmark takes it
    page.goto(f"{base}/?{record['query']}")
    settle(page, "--model")
    shown = page_figures(page)
    assert {k: record[k] for k in shown} == shown
