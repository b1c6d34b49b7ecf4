"""`lora-plan serve`: a local page to click through a plan.

The page holds no planning logic. Every number it draws comes from one endpoint,
`GET /api/plan`, whose query keys are the `plan` command's option names
(`/api/plan?model=8b&method=lora&rank=16`). The query becomes an argv and runs the very same click
command, so the answer is exactly what `lora-plan ... --format json` prints, and an option added to
`plan` is accepted here, and appears in the page's form, with no edit to this file.

Endpoints (standard library only: `http.server`, one thread per request):

    GET  /                 the page (static files shipped in the package, no CDN: works offline)
    GET  /api/options      the plan command's options: name, kind, choices, default, help
    GET  /api/plan?...     what `lora-plan plan ARGS` prints (`--format json` unless given);
                           bad input: HTTP 400 and the CLI's one-line `Error: ...`
    POST /api/config       an uploaded config.json (`?filename=` its name): checked as `--model PATH`
                           checks it, kept in a temporary folder, answered with that folder for
                           `model=`
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import itertools
import json
import re
import shlex
import sys
import tempfile
import threading
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from urllib.parse import parse_qsl, quote, urlsplit

import click

DEFAULT_PORT = 8765
MAX_CONFIG_BYTES = 1 << 20  # a config.json is a few kB; anything near this is not one
STATIC_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}
LOOPBACK = ("127.0.0.1", "localhost", "::1")
ON = ("", "1", "on", "true", "yes")
OFF = ("0", "off", "false", "no")
_PRINTABLE = "".join(chr(c) for c in range(32, 127) if chr(c) != "%")

# click.echo writes to sys.stdout; the plan runs under this lock so each answer captures its own
# output. A plan takes a fraction of a second, so requests queueing here is not felt.
_PLAN_LOCK = threading.Lock()

# The page names a channel per tab and purpose (`X-Lora-Plan-Channel`); while plans queue for the
# lock, only the newest request of each channel is planned, the older ones (which the page has
# dropped already) are answered 409 at once. Slow plans (--fit on a big model) then cost one wait,
# not one per keystroke.
_LATEST: dict[str, int] = {}
_LATEST_LOCK = threading.Lock()
_SEQUENCE = itertools.count()
SUPERSEDED = (409, "text/plain; charset=utf-8", "Error: superseded by a newer request\n")


def _plan_command() -> click.Command:
    from .commands import plan_command

    return plan_command


def _options() -> dict[str, tuple[click.Option, bool]]:
    """Query key -> (option, value of a flag key): `grad-checkpointing` -> on, `no-...` -> off."""
    keys: dict[str, tuple[click.Option, bool]] = {}
    for param in _plan_command().params:
        if not isinstance(param, click.Option):
            continue
        for opt in param.opts:
            keys[opt.lstrip("-")] = (param, True)
        for opt in param.secondary_opts:
            keys[opt.lstrip("-")] = (param, False)
    return keys


def query_to_argv(pairs: list[tuple[str, str]]) -> list[str]:
    """The `plan` argv for a query: `rank=16` -> `--rank 16`; a flag takes on/off (or no value);
    an empty value means the option is not given. An unknown key goes through as `--key`, so the
    command rejects it as it rejects a mistyped option, with its suggestions."""
    options = _options()
    argv: list[str] = []
    for key, value in pairs:
        if key not in options:
            argv += [f"--{key}", *([value] if value else [])]
            continue
        param, on = options[key]
        if param.is_flag and not param.count:
            state = value.strip().lower()
            if state not in ON + OFF:
                raise click.UsageError(f"--{key} is a flag: give on or off, not {value!r}")
            on = on == (state in ON)
            opts = param.opts if on else param.secondary_opts
            argv += opts[:1]  # a flag with no --no- form is simply left out when off
        elif value.strip():
            argv += [f"--{key}", value.strip()]
    return argv


def command_line(argv: list[str]) -> str:
    """The shell command a user can paste: `lora-plan --model 8b --rank 16`."""
    return shlex.join(["lora-plan", *argv])


def run_plan(argv: list[str], channel: str = "") -> tuple[int, str, str]:
    """Run `lora-plan plan ARGV` (with `--format json` unless the argv sets a format or --explain)
    and return (HTTP status, content type, body): the CLI's output, or its one-line error; or
    `SUPERSEDED` when a newer request of the same `channel` arrived while this one waited."""
    if "--format" not in argv and "--explain" not in argv:
        argv = [*argv, "--format", "json"]
    json_out = "--explain" not in argv and argv[argv.index("--format") + 1] == "json"
    ticket = next(_SEQUENCE)
    if channel:
        with _LATEST_LOCK:
            _LATEST[channel] = ticket
    out = io.StringIO()
    try:
        with _PLAN_LOCK, contextlib.redirect_stdout(out):
            if channel and _LATEST.get(channel) != ticket:
                return SUPERSEDED
            _plan_command().main(argv, prog_name="lora-plan", standalone_mode=False)
    except click.ClickException as exc:
        return 400, "text/plain; charset=utf-8", f"Error: {exc.format_message()}\n"
    except click.exceptions.Exit as exc:  # --help-like early exits: nothing to plan
        return (200 if exc.exit_code == 0 else 400), "text/plain; charset=utf-8", out.getvalue()
    except click.Abort:
        return 400, "text/plain; charset=utf-8", "Error: aborted\n"
    return 200, "application/json" if json_out else "text/plain; charset=utf-8", out.getvalue()


def options_schema() -> list[dict]:
    """The plan command's options as the page's form draws them, read from click itself."""
    command = _plan_command()
    ctx = command.make_context("lora-plan", [], resilient_parsing=True)
    suggestions = _suggestions()
    fields = []
    for param in command.params:
        if not isinstance(param, click.Option):
            continue
        kind = ("flag" if param.is_flag else "choice" if isinstance(param.type, click.Choice)
                else "int" if isinstance(param.type, click.types.IntParamType)
                else "float" if isinstance(param.type, click.types.FloatParamType) else "text")
        default = ctx.params.get(param.name)
        if isinstance(default, tuple):
            default = ",".join(map(str, default))
        field = {
            "key": param.opts[0].lstrip("-"),
            "off_key": param.secondary_opts[0].lstrip("-") if param.secondary_opts else None,
            "kind": kind,
            "multiple": bool(param.multiple),
            "choices": list(param.type.choices) if kind == "choice" else None,
            "default": default,
            "metavar": param.metavar,
            "help": param.help or "",
            "suggestions": suggestions.get(param.opts[0].lstrip("-")),
        }
        if isinstance(param.type, click.IntRange):
            field["min"] = param.type.min
        fields.append(field)
    return fields


def _suggestions() -> dict[str, list[dict]]:
    """Known values for the free-text options (the catalog, GPUs, methods, target presets)."""
    from ..catalog import CATALOG
    from ..counts import PRESET_NAMES, total_params
    from ..gpus import GPUS, MIB
    from ..plan import METHODS

    return {
        "model": [{"value": s.name, "label": f"{total_params(s) / 1e9:.3g}B {s.family}"} for s in CATALOG],
        "gpu": [{"value": g.name, "label": f"{g.memory_bytes / MIB:,.0f} MiB"} for g in GPUS],
        "method": [{"value": m, "label": m} for m in METHODS],
        "targets": [{"value": t, "label": "preset"} for t in PRESET_NAMES],
    }


def _safe_name(text: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", text.rstrip("/").rsplit("/", 1)[-1]).strip("-.")
    return name[:64] or "custom"


def save_config(data: bytes, folder: Path, filename: str = "") -> str:
    """Keep an uploaded config.json under `folder` and return the path `--model` takes for it.

    The folder is named by the content's hash (the same upload gets the same link) and by the
    model's name, which becomes the plan's model name as a downloaded model's folder would: the
    uploaded file's name unless it is plain `config.json`, else the config's `_name_or_path`,
    else `uploaded-<model_type>`. The file is checked exactly as `lora-plan --model PATH` checks it."""
    from ..errors import PlanError
    from ..resolve import resolve_model

    if len(data) > MAX_CONFIG_BYTES:
        raise PlanError(f"a config.json is a few kB; this upload is {len(data):,} bytes")
    try:
        config = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PlanError(f"the uploaded file is not JSON: {exc}") from None
    config = config if isinstance(config, dict) else {}  # not an object: resolve_model says so below
    stem = Path(filename).stem if filename else ""
    if stem and stem != "config":
        name = _safe_name(stem)
    elif config.get("_name_or_path"):
        name = _safe_name(str(config["_name_or_path"]))
    else:
        name = "uploaded-" + _safe_name(str(config.get("model_type", "model")))
    target = folder / hashlib.sha256(data).hexdigest()[:12] / name
    target.mkdir(parents=True, exist_ok=True)
    (target / "config.json").write_bytes(data)
    try:
        resolve_model(str(target))
    except PlanError as exc:
        (target / "config.json").unlink()
        # a message that names the file names it as the user knows it, not our temporary copy
        shown = filename or "config.json"
        message = str(exc).replace(str(target / "config.json"), shown).replace(str(target), shown)
        raise PlanError(message) from None
    return str(target)


class PlanHandler(BaseHTTPRequestHandler):
    """The page, its static files and the API. `server.upload_dir` holds uploaded configs."""

    server_version = "lora-plan"

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (the base class's name)
        if getattr(self.server, "verbose", False):
            super().log_message(format, *args)

    def _send(self, status: int, content_type: str, body: str | bytes, headers: dict | None = None):
        data = body.encode() if isinstance(body, str) else body
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _host_ok(self) -> bool:
        """Bound to loopback, answer only requests addressed to loopback and sent by pages of
        loopback: a site elsewhere can neither reach this server through a DNS name that resolves
        to 127.0.0.1 nor make the browser post uploads to it."""
        if self.server.server_address[0] not in ("127.0.0.1", "::1"):
            return True
        origin = self.headers.get("Origin")
        if origin is not None and urlsplit(origin).hostname not in LOOPBACK:
            return False
        return urlsplit("//" + (self.headers.get("Host") or "")).hostname in LOOPBACK

    def _guarded(self, handler) -> None:
        if not self._host_ok():
            self._send(403, "text/plain; charset=utf-8", "Error: this server answers only on localhost\n")
            return
        try:
            handler()
        except Exception as exc:  # a bug of ours: one line to the page, the traceback to the terminal
            traceback.print_exc(file=sys.stderr)
            message = f"Error: internal error ({type(exc).__name__}: {exc})\n"
            self._send(500, "text/plain; charset=utf-8", message)

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self._guarded(self._get)

    def do_POST(self) -> None:  # noqa: N802
        self._guarded(self._post)

    def _get(self) -> None:
        url = urlsplit(self.path)
        if url.path == "/api/plan":
            try:
                argv = query_to_argv(parse_qsl(url.query, keep_blank_values=True))
            except click.ClickException as exc:
                self._send(400, "text/plain; charset=utf-8", f"Error: {exc.format_message()}\n")
                return
            status, content_type, body = run_plan(argv, self.headers.get("X-Lora-Plan-Channel", ""))
            # headers are latin-1: the command is percent-encoded, all of printable ASCII but % kept
            command = quote(command_line(argv), safe=_PRINTABLE)
            self._send(status, content_type, body, {"X-Lora-Plan-Command": command})
        elif url.path == "/api/options":
            self._send(200, "application/json", json.dumps(options_schema()))
        elif url.path in ("/", "/index.html"):
            self._static("index.html")
        elif url.path == "/favicon.ico":
            self._send(204, "text/plain", b"")
        elif url.path.startswith("/static/"):
            self._static(url.path.removeprefix("/static/"))
        else:
            self._send(404, "text/plain; charset=utf-8", "Error: not found\n")

    def _static(self, name: str) -> None:
        suffix = Path(name).suffix
        if "/" in name or name.startswith(".") or suffix not in STATIC_TYPES:
            self._send(404, "text/plain; charset=utf-8", "Error: not found\n")
            return
        resource = resources.files("lora_planner.cli").joinpath("static", name)
        if not resource.is_file():
            self._send(404, "text/plain; charset=utf-8", "Error: not found\n")
            return
        self._send(200, STATIC_TYPES[suffix], resource.read_bytes())

    def _post(self) -> None:
        from ..errors import PlanError

        url = urlsplit(self.path)
        if url.path != "/api/config":
            self._send(404, "text/plain; charset=utf-8", "Error: not found\n")
            return
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_CONFIG_BYTES:
            if length <= 16 * MAX_CONFIG_BYTES:
                self.rfile.read(length)  # drain it, so the client reads the answer, not a reset
            self._send(400, "text/plain; charset=utf-8",
                       f"Error: a config.json is a few kB; this upload is {length:,} bytes\n")
            return
        try:
            filename = dict(parse_qsl(url.query)).get("filename", "")
            model = save_config(self.rfile.read(length), self.server.upload_dir, filename)
        except PlanError as exc:
            self._send(400, "text/plain; charset=utf-8", f"Error: {exc}\n")
            return
        self._send(200, "application/json", json.dumps({"model": model}))


def make_server(host: str = "127.0.0.1", port: int = DEFAULT_PORT, upload_dir: Path | None = None,
                verbose: bool = False) -> ThreadingHTTPServer:
    """A server ready for `serve_forever()`; port 0 picks a free one (`server.server_address`)."""
    server = ThreadingHTTPServer((host, port), PlanHandler)
    server.daemon_threads = True
    server.upload_dir = upload_dir or Path(tempfile.mkdtemp(prefix="lora-plan-serve-"))
    server.verbose = verbose
    return server


@click.command("serve")
@click.option("--port", type=click.IntRange(0, 65535), default=DEFAULT_PORT, show_default=True,
              help="Port to listen on (0: any free port).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind. The default answers this machine only; 0.0.0.0 exposes the "
                   "planner (and the paths it can read) to the network.")
@click.option("--open", "open_browser", is_flag=True, help="Open the page in the default browser.")
@click.option("--verbose", is_flag=True, help="Log every request.")
def serve_command(port: int, host: str, open_browser: bool, verbose: bool) -> None:
    """Serve a local page to click through a plan: a form for every `plan` option, memory by term
    against the GPU's capacity, GPUs, checkpoints, the derivation, and the matching command line.

    \b
        lora-plan serve --open
        curl 'http://127.0.0.1:8765/api/plan?model=8b&method=lora&rank=16'
    """
    from .common import UserError

    try:
        server = make_server(host, port, verbose=verbose)
    except OSError as exc:
        raise UserError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    bound_host, bound_port = server.server_address[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    url = f"http://{'127.0.0.1' if bound_host == '0.0.0.0' else shown}:{bound_port}/"
    click.echo(f"lora-plan serving {url}  (Ctrl+C to stop)")
    if open_browser:
        import webbrowser

        webbrowser.open(url)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
