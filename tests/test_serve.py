"""`lora-plan serve`'s endpoint against the CLI itself: for the same options, `GET /api/plan` must
answer exactly what `lora-plan ... --format json` prints, and each bad input the CLI's error line.

The oracle is the click command run through CliRunner with an argv the test writes by hand from
the same settings; the server runs in a thread on a free port and is asked over real HTTP.
"""

from __future__ import annotations

import json
import re
import shlex
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import unquote, urlencode

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lora_planner.catalog import CATALOG
from lora_planner.cli import main
from lora_planner.cli.serve import make_server
from lora_planner.spec import to_hf_config

STATIC = Path(__file__).resolve().parents[1] / "lora_planner" / "cli" / "static"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = make_server("127.0.0.1", 0, upload_dir=tmp_path_factory.mktemp("uploads"))
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def get(url: str, headers: dict | None = None) -> tuple[int, dict, str]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, dict(r.headers), r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read().decode()


def post(url: str, data: bytes) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data, method="POST"), timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def cli(argv: list[str]):
    # CliRunner swaps sys.stdout, as the server does under its lock while it plans; the server runs
    # in this process, so the CLI runs under that lock too, or one would capture the other's output.
    from lora_planner.cli import serve

    with serve._PLAN_LOCK:
        return CliRunner().invoke(main, argv)


def assert_same(server: str, pairs: list[tuple[str, str]], argv: list[str]) -> None:
    """The endpoint's answer for `pairs` equals the CLI's for `argv --format json`."""
    status, headers, body = get(f"{server}/api/plan?{urlencode(pairs)}")
    result = cli([*argv, "--format", "json"])
    if result.exit_code == 0:
        assert status == 200, body
        assert headers["Content-Type"] == "application/json"
        assert body == result.output  # byte for byte, not merely equal as JSON
    else:
        assert result.exit_code == 2, result.output
        assert status == 400, body
        assert body.strip() == result.output.strip().splitlines()[-1]
        assert body.startswith("Error: ") and body.count("\n") == 1


# Settings as (query key, query value, argv): written here, not derived from the server's mapping.
def opt(key: str, values) -> st.SearchStrategy:
    return st.sampled_from(values).map(lambda v: (key, str(v), [f"--{key}", str(v)]))


def flag(key: str, off: str | None = None) -> st.SearchStrategy:
    choices = [(key, "on", [f"--{key}"])]
    if off:
        choices.append((key, "off", [f"--{off}"]))
    return st.sampled_from(choices)


SETTINGS = [
    opt("method", ["full", "lora", "qlora", "lora,qlora", "full,lora"]),
    opt("rank", [1, 8, 16, "4,64", 0]),
    opt("targets", ["all-linear", "q_proj,v_proj", "default", "no_such_module"]),
    opt("precision", ["fp32", "amp", "mixed", "bf16", "pure-bf16"]),
    opt("optimizer", ["adamw", "adamw-8bit", "sgd", "adafactor"]),
    opt("batch-size", [1, 2, 8, 0]),
    opt("seq-len", [128, 512, 4096]),
    flag("grad-checkpointing", "no-grad-checkpointing"),
    opt("attention", ["sdpa", "eager"]),
    opt("gpu", ["h100", "a100-40gb", "RTX-4090-24GB", "t4", "h1000"]),
    opt("gpu-mem", ["24GB", "80GiB", "lots"]),
    opt("num-gpus", [1, 2, 8]),
    opt("sharding", ["none", "zero1", "zero2", "zero3", "fsdp"]),
    opt("offload", ["none", "optimizer", "optimizer+params"]),
    opt("tokens", ["1e8", "2B"]),
    flag("dora"),
    opt("tasks", [1, 3]),
]


@st.composite
def option_sets(draw):
    model = draw(st.sampled_from(["gpt2", "llama-3.2-1b", "8b", "70b", "mixtral-8x7b", "qwen2.5-7b"]))
    chosen = draw(st.lists(st.sampled_from(range(len(SETTINGS))), max_size=6, unique=True))
    pairs, argv = [("model", model)], ["--model", model]
    for i in chosen:
        key, value, args = draw(SETTINGS[i])
        pairs.append((key, value))
        argv += args
    return pairs, argv


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(option_sets())
def test_endpoint_answers_what_the_cli_prints(server, case):
    pairs, argv = case
    assert_same(server, pairs, argv)


def test_every_choice_and_flag_of_plan(server):
    """Each option the plan command has, read from /api/options so options added later are
    covered too: every choice, and each flag on and off, answers as the CLI does."""
    _, _, body = get(f"{server}/api/options")
    schema = json.loads(body)
    base = [("model", "gpt2"), ("method", "lora,full")]
    base_argv = ["--model", "gpt2", "--method", "lora,full"]
    checked = 0
    for field in schema:
        if field["key"] in ("format", "explain"):
            continue  # these change what is printed, not the plan; tested below
        if field["kind"] == "choice":
            for choice in field["choices"]:
                key = field["key"]
                assert_same(server, [*base, (key, choice)], [*base_argv, f"--{key}", choice])
                checked += 1
        elif field["kind"] == "flag":
            assert_same(server, [*base, (field["key"], "on")], [*base_argv, f"--{field['key']}"])
            if field["off_key"]:
                assert_same(server, [*base, (field["key"], "off")], [*base_argv, f"--{field['off_key']}"])
                assert_same(server, [*base, (field["off_key"], "")], [*base_argv, f"--{field['off_key']}"])
            checked += 1
    assert checked >= 20


def test_schema_lists_every_option_of_plan(server):
    from lora_planner.cli.commands import plan_command

    _, _, body = get(f"{server}/api/options")
    keys = {f["key"] for f in json.loads(body)}
    assert keys == {p.opts[0].lstrip("-") for p in plan_command.params if p.opts[0].startswith("--")}
    by_key = {f["key"]: f for f in json.loads(body)}
    assert by_key["rank"]["multiple"] and by_key["batch-size"]["kind"] == "int"
    assert by_key["grad-checkpointing"]["off_key"] == "no-grad-checkpointing"
    assert "llama-3.1-8b" in [s["value"] for s in by_key["model"]["suggestions"]]


def test_the_command_header_reproduces_the_plan(server):
    status, headers, body = get(f"{server}/api/plan?model=8b&method=qlora&rank=16&batch-size=4"
                                "&grad-checkpointing=on&double-quant=off")
    assert status == 200
    command = unquote(headers["X-Lora-Plan-Command"])
    assert command == ("lora-plan --model 8b --method qlora --rank 16 --batch-size 4 "
                       "--grad-checkpointing --no-double-quant")
    assert cli([*command.split()[1:], "--format", "json"]).output == body


def test_other_formats_and_explain_are_what_the_cli_prints(server):
    for extra, argv in [([("format", "markdown")], ["--format", "markdown"]),
                        ([("format", "csv")], ["--format", "csv"]),
                        ([("explain", "on")], ["--explain"])]:
        status, headers, body = get(f"{server}/api/plan?{urlencode([('model', 'gpt2'), *extra])}")
        assert status == 200 and headers["Content-Type"].startswith("text/plain")
        assert body == cli(["--model", "gpt2", *argv]).output


@pytest.mark.parametrize("query, argv", [
    ("model=gpt2&foo=1", ["--model", "gpt2", "--foo", "1"]),
    ("model=gpt2&rank=eight", ["--model", "gpt2", "--rank", "eight"]),
    ("model=gpt2&precision=fp8", ["--model", "gpt2", "--precision", "fp8"]),
    ("rank=8", ["--rank", "8"]),
    ("model=lama-3.1-8b", ["--model", "lama-3.1-8b"]),
    ("params=7e9&method=lora", ["--params", "7e9", "--method", "lora"]),
    ("model=./nowhere/config.json", ["--model", "./nowhere/config.json"]),
])
def test_bad_input_is_the_cli_error_line(server, query, argv):
    status, _, body = get(f"{server}/api/plan?{query}")
    result = cli(argv)
    assert result.exit_code == 2 and status == 400
    assert body.strip() == result.output.strip().splitlines()[-1]


def test_a_command_beyond_ascii_travels_percent_encoded(server):
    status, headers, body = get(f"{server}/api/plan?{urlencode({'model': './modèle/config.json'})}")
    assert status == 400 and body == "Error: no such file: ./modèle/config.json\n"
    command = shlex.split(unquote(headers["X-Lora-Plan-Command"]))
    assert command == ["lora-plan", "--model", "./modèle/config.json"]


def test_only_the_newest_queued_request_of_a_channel_is_planned(server):
    """While the planner is busy, three changes from one tab queue: the two older are answered
    409 without planning, the newest is planned; another channel is not touched."""
    from lora_planner.cli import serve

    answers: dict[str, tuple[int, str]] = {}

    def ask(name: str, channel: str, rank: int) -> None:
        request = urllib.request.Request(f"{server}/api/plan?model=gpt2&method=lora&rank={rank}",
                                         headers={"X-Lora-Plan-Channel": channel})
        try:
            with urllib.request.urlopen(request, timeout=30) as r:
                answers[name] = (r.status, r.read().decode())
        except urllib.error.HTTPError as exc:
            answers[name] = (exc.code, exc.read().decode())

    threads = []
    with serve._PLAN_LOCK:  # the planner is busy
        for name, channel, rank in [("a1", "tab:plan", 1), ("a2", "tab:plan", 2), ("b", "tab:explain", 3),
                                    ("a3", "tab:plan", 4)]:
            threads.append(threading.Thread(target=ask, args=(name, channel, rank)))
            threads[-1].start()
            time.sleep(0.3)  # arrive in this order
    for t in threads:
        t.join(timeout=30)
    assert answers["a1"] == answers["a2"] == (409, "Error: superseded by a newer request\n")
    for name, rank in [("a3", 4), ("b", 3)]:
        assert answers[name] == (200, cli(["--model", "gpt2", "--method", "lora", "--rank", str(rank),
                                           "--format", "json"]).output)


def test_a_flag_takes_on_or_off(server):
    status, _, body = get(f"{server}/api/plan?model=gpt2&dora=maybe")
    assert status == 400 and body == "Error: --dora is a flag: give on or off, not 'maybe'\n"
    assert get(f"{server}/api/plan?model=gpt2&dora=")[0] == 200  # no value: the flag is given


def test_uploaded_config_plans_as_the_cli_plans_the_file(server, tmp_path):
    config = {**to_hf_config(next(s for s in CATALOG if s.family == "llama")), "num_hidden_layers": 3,
              "_name_or_path": "acme/tiny-llama"}
    data = json.dumps(config).encode()
    status, body = post(f"{server}/api/config", data)
    assert status == 200, body
    folder = json.loads(body)["model"]
    assert Path(folder).name == "tiny-llama"
    (tmp_path / "tiny-llama").mkdir()
    (tmp_path / "tiny-llama" / "config.json").write_bytes(data)
    status, _, served = get(f"{server}/api/plan?{urlencode({'model': folder, 'rank': '4,8'})}")
    local = str(tmp_path / "tiny-llama")
    expected = json.loads(cli(["--model", local, "--rank", "4,8", "--format", "json"]).output)
    got = json.loads(served)
    assert got["model"]["source"] == folder
    got["model"]["source"] = expected["model"]["source"]  # only where the file lies differs
    assert got == expected and got["model"]["name"] == "tiny-llama"
    assert post(f"{server}/api/config", data) == (200, body)  # the same upload, the same link
    status, body = post(f"{server}/api/config?filename=my-model.json", data)
    assert Path(json.loads(body)["model"]).name == "my-model"  # a file's own name wins


@pytest.mark.parametrize("content", [b"{not json", b'{"model_type": "bert"}', b'{"model_type": "llama"}',
                                     b"[1, 2]"])
def test_bad_upload_is_the_cli_error_line(server, tmp_path, content):
    status, body = post(f"{server}/api/config", content)
    assert status == 400 and body.startswith("Error: ") and body.count("\n") == 1
    (tmp_path / "config.json").write_bytes(content)
    result = cli(["--model", str(tmp_path / "config.json")])
    if content != b"{not json":  # the upload reads JSON itself; past that, the file's own checks
        # where the message names the file, the upload is named as uploaded (here plain config.json)
        line = result.output.strip().splitlines()[-1]
        assert body.strip() == line.replace(str(tmp_path / "config.json"), "config.json")
    else:
        assert result.exit_code == 2 and "JSON" in body


def test_upload_too_large(server):
    status, body = post(f"{server}/api/config", b" " * (2 << 20))
    assert status == 400 and "bytes" in body


def test_page_and_static_files(server):
    status, headers, page = get(f"{server}/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    for ref in re.findall(r'(?:src|href)="(/static/[^"]+)"', page):
        assert get(server + ref)[0] == 200
    assert get(f"{server}/static/../serve.py")[0] == 404
    assert get(f"{server}/static/nothing.js")[0] == 404
    assert get(f"{server}/nowhere")[0] == 404


def test_page_needs_no_network():
    """Offline: nothing the page loads comes from another host (the SVG namespace is a name)."""
    for path in STATIC.iterdir():
        text = path.read_text()
        assert not [u for u in re.findall(r"https?://[^\s\"'`)]+", text) if u != "http://www.w3.org/2000/svg"]


def test_answers_only_on_localhost(server):
    status, _, body = get(f"{server}/api/plan?model=gpt2", headers={"Host": "attacker.example:8765"})
    assert status == 403 and body.startswith("Error: ")
    assert get(f"{server}/api/plan?model=gpt2", headers={"Host": "localhost:1"})[0] == 200
    request = urllib.request.Request(f"{server}/api/config", data=b"{}", method="POST",
                                     headers={"Origin": "https://attacker.example"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)
    assert refused.value.code == 403


def test_serve_command_port_in_use(server):
    port = server.rsplit(":", 1)[1]
    result = cli(["serve", "--port", port])
    assert result.exit_code == 2
    assert result.output.startswith("Error: cannot listen on 127.0.0.1:")
    assert result.output.count("\n") == 1


def test_serve_is_listed():
    assert "serve" in cli(["--help"]).output
    assert "--open" in cli(["serve", "--help"]).output


def test_the_real_command_serves_what_the_cli_prints(tmp_path):
    """`lora-plan serve --port 0` as a user starts it, in its own process, against `lora-plan`
    run in another: the plan's JSON byte for byte."""
    import subprocess
    import sys

    server = subprocess.Popen([sys.executable, "-m", "lora_planner", "serve", "--port", "0"],
                              stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1])
    try:
        line = server.stdout.readline()
        assert line.startswith("lora-plan serving http://127.0.0.1:"), line
        url = line.split()[2]
        status, _, body = get(f"{url}api/plan?model=8b&method=qlora&rank=16&gpu=l4&grad-checkpointing=on")
        printed = subprocess.run([sys.executable, "-m", "lora_planner", "--model", "8b", "--method", "qlora",
                                  "--rank", "16", "--gpu", "l4", "--grad-checkpointing", "--format", "json"],
                                 capture_output=True, text=True, check=True,
                                 cwd=Path(__file__).resolve().parents[1]).stdout
        assert status == 200 and body == printed
    finally:
        server.terminate()
        server.wait(timeout=10)
