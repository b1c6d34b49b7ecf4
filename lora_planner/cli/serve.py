"""`lora-plan serve`: a local page to click through a plan.

The page holds no planning logic. Every number it draws comes from one endpoint,
`GET /api/plan`, whose query keys are the `plan` command's option names
(`/api/plan?model=8b&method=lora&rank=16`). The query is parsed by the very same click command and
planned by the function the command prints (`plan_output`), so the answer is exactly what
`lora-plan ... --format json` prints, and an option added to `plan` is accepted here, and appears
in the page's form, with no edit to this file.

Endpoints (standard library HTTP, plans in a pool of worker processes):

    GET  /                 the page (static files shipped in the package, no CDN: works offline)
    GET  /api/options      the plan command's options: name, kind, choices, default, help
    GET  /api/plan?...     what `lora-plan plan ARGS` prints (`--format json` unless given);
                           bad input: HTTP 400 and the CLI's one-line `Error: ...`
    POST /api/config       an uploaded config.json (`?filename=` its name): checked as `--model PATH`
                           checks it, kept in the server's temporary folder, answered with a token
                           (`upload:<hash>/<name>`) that `model=` takes

What a request may cost (SECURITY.md says it for users):
- files: the page reads none it was not handed. `model=` takes a catalog name, a hub id or an
  upload token, never a path; options that name a file (`price-file`) are refused.
- time: each plan runs in a worker process with a time budget, queueing included; past it, or when
  the client goes away, or when a newer request of the same channel arrives, the worker is killed.
  Requests that search (`fit`) or plan many setups take at most `workers - 1` workers, so one is
  always left for cheap plans.
- size: methods x ranks is bounded before any work starts; a worker's address space is capped.
- connections: a bounded number at once (the rest get 503 at once); an idle one times out.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import ipaddress
import itertools
import json
import os
import re
import select
import shlex
import shutil
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from urllib.parse import parse_qsl, quote, urlsplit

import click

DEFAULT_PORT = 8765
MAX_CONFIG_BYTES = 1 << 20  # a config.json is a few kB; anything near this is not one
DRAIN_BYTES = 16 << 20  # an oversized upload up to this is read and dropped, so its client hears why
STATIC_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}
LOOPBACK = ("127.0.0.1", "localhost", "::1")
ON = ("", "1", "on", "true", "yes")
OFF = ("0", "off", "false", "no")
TEXT = "text/plain; charset=utf-8"
_PRINTABLE = "".join(chr(c) for c in range(32, 127) if chr(c) != "%")
UPLOAD_TOKEN = re.compile(r"upload:([0-9a-f]{12})/([A-Za-z0-9_-][A-Za-z0-9._-]{0,63})")
# owner/name as the hub spells repositories; anything else with a slash is a path
HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")
SUPERSEDED = (409, TEXT, "Error: superseded by a newer request\n")


@dataclass(frozen=True)
class Limits:
    """What one request may cost. `seconds` counts from the request's arrival, so a plan that
    waited for a worker has less left; `max_plans` bounds methods x ranks, `max_fit_plans` the
    same with --fit (each setup then plans about forty times: a search over batch and sequence).
    A plan is "heavy" with --fit or more than `heavy_plans` setups, or of a model recorded from
    transformers (given `recorded_seconds` instead of `seconds`): heavy plans take at most
    `workers - 1` workers. `memory_bytes` caps each worker's address space."""

    seconds: float = 15.0
    # a plan of an uploaded config of a model_type none of our families lays out records its step
    # from transformers the first time (torch imported, then seconds to minutes; cached after)
    recorded_seconds: float = 180.0
    workers: int = 2
    max_plans: int = 64
    max_fit_plans: int = 8
    heavy_plans: int = 8
    connections: int = 32
    idle_seconds: float = 10.0
    memory_bytes: int = 2 << 30


class Refused(Exception):
    """A request we answer with one line and this HTTP status, before or instead of planning."""

    def __init__(self, status: int, message: str):
        super().__init__(message.rstrip("\n") + "\n")
        self.status = status


class ClientGone(Exception):
    """Nothing (more) to send: the client closed its connection while its plan waited, or the
    answer went out already."""


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


def _reads_a_file(param: click.Parameter) -> bool:
    return isinstance(param.type, (click.Path, click.File))


def query_to_args(pairs: list[tuple[str, str]]) -> list[tuple[str, str | None]]:
    """The `plan` options for a query, as (option, value or None for a flag): `rank=16` ->
    ("--rank", "16"); a flag takes on/off (or no value); an empty value means the option is not
    given. An unknown key goes through as `--key`, so the command rejects it as it rejects a
    mistyped option, with its suggestions. An option that names a file on this machine is refused:
    the page reads no file it was not handed."""
    options = _options()
    args: list[tuple[str, str | None]] = []
    for key, value in pairs:
        if key not in options:
            args.append((f"--{key}", value or None))
            continue
        param, on = options[key]
        if _reads_a_file(param):
            raise Refused(400, f"Error: the page reads no file on the server: --{key} is for the "
                               "command line")
        if param.is_flag and not param.count:
            state = value.strip().lower()
            if state not in ON + OFF:
                raise Refused(400, f"Error: --{key} is a flag: give on or off, not {value!r}")
            on = on == (state in ON)
            opts = param.opts if on else param.secondary_opts
            args += [(opt, None) for opt in opts[:1]]  # a flag with no --no- form is left out when off
        elif value.strip():
            args.append((f"--{key}", value.strip()))
    return args


def parse_argv(args: list[tuple[str, str | None]]) -> list[str]:
    """What click parses: `--key=value`, so a value can never be read as another option."""
    return [opt if value is None else f"{opt}={value}" for opt, value in args]


def query_to_argv(pairs: list[tuple[str, str]]) -> list[str]:
    """The `plan` argv for a query as a user would type it: `rank=16` -> `--rank 16`."""
    return [a for opt, value in query_to_args(pairs) for a in (opt, value) if a is not None]


def command_line(argv: list[str]) -> str:
    """The shell command a user can paste: `lora-plan --model 8b --rank 16`."""
    return shlex.join(["lora-plan", *argv])


def with_format(args: list[tuple[str, str | None]]) -> list[tuple[str, str | None]]:
    """JSON unless the query asks for a format or the derivation."""
    if any(opt in ("--format", "--explain") for opt, _ in args):
        return args
    return [*args, ("--format", "json")]


def parse_params(argv: list[str]) -> dict:
    """The plan command's parsed options for `argv` (click's own parsing and checks), or Refused
    with click's one-line error. `--help` is not an option here (it would print on the server)."""
    try:
        ctx = _plan_command().make_context("lora-plan", list(argv), help_option_names=[])
    except click.ClickException as exc:
        raise Refused(400, f"Error: {exc.format_message()}\n") from None
    except click.exceptions.Exit:
        raise Refused(400, "Error: nothing to plan\n") from None
    return ctx.params


def plan_size(params: dict) -> int:
    """Setups the plan will make: one for full fine-tuning, one per rank for each adapter method.
    An unreadable method or rank counts once: the planner says what is wrong with it."""
    from ..errors import PlanError
    from ..plan import METHODS
    from .common import parse_ranks, split_values

    methods = set(split_values(params.get("methods") or ())) or (
        {"full"} if params.get("params_text") else set(METHODS))
    try:
        ranks = len(parse_ranks(params.get("ranks") or ()))
    except PlanError:
        ranks = 1
    return sum(1 if m == "full" else ranks for m in methods)


def check_budget(params: dict, limits: Limits) -> bool:
    """Refuse a plan over the size budget before any work starts; True when it is heavy."""
    size = plan_size(params)
    if params.get("fit") and size > limits.max_fit_plans:
        raise Refused(400, f"Error: the page plans at most {limits.max_fit_plans} method/rank "
                           f"setups with fit (asked for {size}); run `lora-plan` for more\n")
    if size > limits.max_plans:
        raise Refused(400, f"Error: the page plans at most {limits.max_plans} method/rank setups "
                           f"at once (asked for {size}); run `lora-plan` for more\n")
    return bool(params.get("fit")) or size > limits.heavy_plans


def check_model(text: str | None) -> None:
    """`model=` over HTTP is a catalog name, a hub id or an upload token: never a path here."""
    if not text:
        return
    from ..catalog import lookup

    if UPLOAD_TOKEN.fullmatch(text) or lookup(text) is not None:
        return
    if HUB_ID.fullmatch(text) and ".." not in text and not text.endswith(".json"):
        return
    if "/" in text or "\\" in text or text.startswith((".", "~")) or text.endswith(".json") \
            or "\0" in text:
        raise Refused(400, "Error: the page reads no file on the server: give model= a catalog "
                           "name or a hub id, or upload the config.json\n")


def options_schema() -> list[dict]:
    """The plan command's options as the page's form draws them, read from click itself. Options
    that name a file are left out: the page does not take them."""
    command = _plan_command()
    ctx = command.make_context("lora-plan", [], resilient_parsing=True)
    suggestions = _suggestions()
    fields = []
    for param in command.params:
        if not isinstance(param, click.Option) or _reads_a_file(param):
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


# --- the worker processes ----------------------------------------------------------------------


def _worker_init(cwd: str, memory_bytes: int) -> None:
    """Each worker: no file a relative name could reach (an empty folder as its working directory),
    a capped address space, and the planner imported before the first request."""
    os.chdir(cwd)
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    except (ImportError, ValueError, OSError):  # not on this platform: the time budget still holds
        pass
    from . import commands  # noqa: F401


def _worker_plan(argv: list[str]) -> tuple[int, str]:
    """In a worker: (HTTP status, body) of `lora-plan plan ARGV`: its output, or its error line.
    Parsed inside a click context, as the command runs (a default is told from a given value)."""
    from ..errors import PlanError
    from .commands import gpu_given, plan_output

    try:
        with _plan_command().make_context("lora-plan", list(argv), help_option_names=[]) as ctx:
            return 200, plan_output(**ctx.params, gpu_given=gpu_given(ctx))
    except PlanError as exc:
        return 400, f"Error: {exc}\n"
    except click.ClickException as exc:
        return 400, f"Error: {exc.format_message()}\n"
    except (MemoryError, RecursionError):
        return 503, "Error: this plan needs more memory than the page gives one request\n"


def _worker_check_config(path: str) -> str | None:
    """In a worker: None when `--model PATH` reads the config, else its one-line error."""
    import importlib.util

    from ..errors import PlanError
    from ..resolve import OtherConfig, resolve_model

    try:
        model = resolve_model(path, other_types=True)
        if isinstance(model, OtherConfig) and importlib.util.find_spec("transformers") is not None:
            from ..measure.recorded import check_config

            # another model_type: refused as `plan` refuses it (without transformers, planning it
            # says which extra it needs)
            check_config(model.config)
    except PlanError as exc:
        return str(exc)
    except (MemoryError, RecursionError):
        return "this config needs more memory than the page gives one request"
    return None


def _warm() -> None:
    """A task that does nothing: scheduling it starts the workers before the first request."""


# --- the server --------------------------------------------------------------------------------


class PlanServer(ThreadingHTTPServer):
    """The HTTP server, its worker pool, its upload folder and its request bookkeeping."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], limits: Limits, root: Path, owns_root: bool,
                 allowed_hosts: frozenset[str], verbose: bool = False):
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.limits = limits
        self.root, self.owns_root = root, owns_root
        self.uploads = root / "uploads"
        self.verbose = verbose
        self.allowed_hosts = allowed_hosts
        self.connections = threading.BoundedSemaphore(limits.connections)
        self.heavy = threading.BoundedSemaphore(max(1, limits.workers - 1))
        # The page names a channel per tab and purpose (`X-Lora-Plan-Channel`): only the newest
        # request of each channel is worth planning, an older one still waiting or planning is
        # stopped and answered 409. An entry lives while its request does, so the table is
        # bounded by the connections.
        self.latest: dict[str, int] = {}
        self.latest_lock = threading.Lock()
        self.sequence = itertools.count()
        self.pool = None
        self.pool_lock = threading.Lock()
        try:
            super().__init__(address, PlanHandler)
        except OSError:
            self._remove_root()
            raise
        self.uploads.mkdir(parents=True, exist_ok=True)
        (root / "cwd").mkdir(exist_ok=True)
        self.pool = _make_pool(limits, str(root / "cwd"))

    # connections beyond the limit are answered at once, without a thread
    def process_request(self, request, client_address):
        if not self.connections.acquire(blocking=False):
            try:
                request.settimeout(1.0)
                body = b"Error: the server is busy; try again\n"
                request.sendall(b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: text/plain; "
                                b"charset=utf-8\r\nConnection: close\r\nContent-Length: "
                                + str(len(body)).encode() + b"\r\n\r\n" + body)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.connections.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.connections.release()

    def server_close(self) -> None:
        super().server_close()
        if self.pool is not None:
            # pebble's join waits for its own threads without a limit: wait a while in a thread of
            # its own, so stopping never hangs; workers left over end with this process
            self.pool.stop()
            joiner = threading.Thread(target=self.pool.join, daemon=True)
            joiner.start()
            joiner.join(timeout=5)
        self._remove_root()

    def _remove_root(self) -> None:
        if self.owns_root:
            shutil.rmtree(self.root, ignore_errors=True)

    # --- planning in the pool ---

    def enter_channel(self, channel: str) -> int:
        ticket = next(self.sequence)
        if channel:
            with self.latest_lock:
                self.latest[channel] = ticket
        return ticket

    def leave_channel(self, channel: str, ticket: int) -> None:
        if channel:
            with self.latest_lock:
                if self.latest.get(channel) == ticket:
                    del self.latest[channel]

    def superseded(self, channel: str, ticket: int) -> bool:
        return bool(channel) and self.latest.get(channel, ticket) != ticket

    def run_plan(self, argv: list[str], heavy: bool, wait: Waiter) -> tuple[int, str]:
        """(status, body) of `plan ARGV` from a worker; Refused past the time budget."""
        if heavy:
            wait.acquire(self.heavy)
        try:
            return wait.result(self.schedule(_worker_plan, argv))
        finally:
            if heavy:
                self.heavy.release()

    def check_config(self, path: str, wait: Waiter) -> str | None:
        return wait.result(self.schedule(_worker_check_config, path))

    def schedule(self, function, *args):
        """A task for the pool. A pool that broke (its workers could not start: the forkserver
        killed, say) is replaced, so one bad moment is not a 500 for every later request."""
        try:
            return self.pool.schedule(function, args=args)
        except RuntimeError:
            with self.pool_lock:
                if not self.pool.active:
                    broken, self.pool = self.pool, _make_pool(self.limits, str(self.root / "cwd"))
                    broken.stop()
            return self.pool.schedule(function, args=args)

    def upload_path(self, token: str) -> Path:
        """The folder an upload token names, or Refused when this server holds no such upload."""
        match = UPLOAD_TOKEN.fullmatch(token)
        folder = self.uploads / match[1] / match[2] if match else None
        if folder is None or not (folder / "config.json").is_file():
            raise Refused(400, f"Error: no upload {token} on this server (uploads last until it "
                               "stops): upload the config.json again\n")
        return folder


def _make_pool(limits: Limits, cwd: str):
    import multiprocessing

    from pebble import ProcessPool

    # forkserver: workers start from a clean process (not a fork of this threaded one) with the
    # planner imported once, so a worker killed for its budget is replaced in milliseconds
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["lora_planner.cli.commands"])
    else:
        context = multiprocessing.get_context("spawn")
    pool = ProcessPool(max_workers=limits.workers, initializer=_worker_init,
                       initargs=(cwd, limits.memory_bytes), context=context)
    pool.schedule(_warm)
    return pool


class Waiter:
    """Waits for a worker's answer while the request lasts: within the time budget, while the
    client is connected, while no newer request of its channel arrived. Whatever ends the wait
    cancels the task, and pebble kills a worker whose task is cancelled while it runs."""

    POLL = 0.05

    def __init__(self, server: PlanServer, connection: socket.socket, channel: str, ticket: int,
                 started: float, seconds: float | None = None):
        self.server, self.connection = server, connection
        self.channel, self.ticket = channel, ticket
        self.seconds = server.limits.seconds if seconds is None else seconds
        self.deadline = started + self.seconds

    def check(self) -> None:
        if self.server.superseded(self.channel, self.ticket):
            raise Refused(*SUPERSEDED[::2])
        if time.monotonic() > self.deadline:
            raise Refused(504, f"Error: the plan took longer than the page's {self.seconds:g} s; ask "
                               "for fewer ranks or methods, or run `lora-plan` for it\n")
        if _client_gone(self.connection):
            raise ClientGone

    def acquire(self, semaphore: threading.Semaphore) -> None:
        while not semaphore.acquire(timeout=self.POLL):
            self.check()

    def result(self, future):
        try:
            while True:
                done, _ = concurrent.futures.wait([future], timeout=self.POLL)
                if done:
                    break
                self.check()
        except BaseException:
            future.cancel()
            raise
        try:
            return future.result()
        except concurrent.futures.CancelledError:
            raise Refused(503, "Error: the plan was stopped\n") from None
        except Exception as exc:
            from pebble import ProcessExpired

            if isinstance(exc, ProcessExpired):
                raise Refused(503, "Error: the plan's worker died (out of memory?)\n") from None
            raise


def _recorded_upload(path: Path) -> bool:
    """Whether an uploaded config.json is of a model_type planned from its recording (no family of
    ours lays it out: `resolve.OtherConfig`)."""
    from ..errors import PlanError
    from ..resolve import OtherConfig, resolve_model

    try:
        return isinstance(resolve_model(str(path), other_types=True), OtherConfig)
    except (PlanError, OSError, ValueError):  # the worker says what is wrong with it
        return False


def _client_gone(connection: socket.socket) -> bool:
    """True when the client closed its side: readable, and a peek reads the end of the stream."""
    try:
        readable, _, _ = select.select([connection], [], [], 0)
        return bool(readable) and connection.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):
        return True


def _safe_name(text: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", text.rstrip("/").rsplit("/", 1)[-1]).strip("-.")
    return name[:64] or "custom"


def form_upload_hint(host: str) -> str:
    """What to send instead of a form upload (`curl -F file=@config.json`): the page reads the
    config as the request's raw body, as its own upload button sends it."""
    host = host if re.fullmatch(r"[A-Za-z0-9.:\[\]-]{1,100}", host) else "HOST:PORT"
    return ("a form upload (multipart/form-data) is not read: send the file as the raw body, "
            f"curl --data-binary @config.json -H 'Content-Type: application/json' "
            f"'http://{host}/api/config?filename=config.json'")


def upload_name(data: bytes, filename: str = "") -> str:
    """The model's name for an upload, as a downloaded model's folder would give it: the uploaded
    file's name unless it is plain `config.json`, else the config's `_name_or_path`, else
    `uploaded-<model_type>`."""
    from ..errors import PlanError

    try:
        config = json.loads(data)
    except (ValueError, RecursionError) as exc:  # not JSON, not UTF-8, a 5,000-digit number, deep
        raise PlanError(f"the uploaded file is not JSON we can read: {exc}") from None
    config = config if isinstance(config, dict) else {}  # not an object: the check says so
    stem = Path(filename).stem if filename else ""
    if stem and stem != "config":
        return _safe_name(stem)
    if isinstance(config.get("_name_or_path"), str) and config["_name_or_path"]:
        return _safe_name(config["_name_or_path"])
    return "uploaded-" + _safe_name(str(config.get("model_type", "model")))


def write_atomically(path: Path, data: bytes) -> None:
    """Write to a temporary name beside `path`, then rename: a reader sees all or nothing."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".upload-")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class PlanHandler(BaseHTTPRequestHandler):
    """The page, its static files and the API."""

    server: PlanServer
    server_version = "lora-plan"

    def setup(self) -> None:
        self.timeout = self.server.limits.idle_seconds  # an idle connection is closed, not kept
        super().setup()

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (the base class's name)
        if self.server.verbose:
            super().log_message(format, *args)

    def _send(self, status: int, content_type: str, body: str | bytes, headers: dict | None = None):
        data = body.encode() if isinstance(body, str) else body
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        # no other site may frame the page (and so make it plan, or click on it)
        self.send_header("X-Frame-Options", "DENY")
        self.send_header("Content-Security-Policy", "frame-ancestors 'none'")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _host_ok(self) -> bool:
        """Addressed to an allowed host: a site elsewhere cannot reach this server through a DNS
        name that resolves to it (DNS rebinding)."""
        hostname = _hostname((self.headers.get("Host") or "").strip().lower())
        return hostname is not None and hostname in self.server.allowed_hosts

    def _same_origin(self) -> bool:
        """Sent by this server's own page, or by no page. Origin, else Referer: a page's request
        must come from this very origin, scheme, host and port (a page on another loopback port is
        another site). Sec-Fetch-Site: a browser that sends it says whether another site made the
        request, Referer or not. The page and its files are not asked this (a link from elsewhere
        opens the page); what plans or uploads is."""
        if self.headers.get("Sec-Fetch-Site", "same-origin").lower() not in ("same-origin", "none"):
            return False
        source = self.headers.get("Origin") or self.headers.get("Referer")
        if source is None:
            return True  # not sent by a page (curl, a script): nothing to check
        url = urlsplit(source.strip().lower())
        host = (self.headers.get("Host") or "").strip().lower()
        return url.scheme in ("http", "https") and _netloc(url.netloc, url.scheme) == _netloc(host, "http")

    def _guarded(self, handler) -> None:
        path = urlsplit(self.path).path
        work = self.command != "GET" or (path.startswith("/api/") and path != "/api/options")
        if not self._host_ok() or (work and not self._same_origin()):
            self._send(403, TEXT, "Error: this server answers its own page on an allowed host only "
                                  "(see --allow-host)\n")
            return
        try:
            handler()
        except Refused as exc:
            self._send(exc.status, TEXT, str(exc))
        except ClientGone:
            self.close_connection = True
        except Exception as exc:  # a bug of ours: one line to the page, the traceback to the terminal
            import traceback

            traceback.print_exc(file=sys.stderr)
            print(getattr(exc, "traceback", ""), file=sys.stderr)  # a worker's, where pebble kept it
            self._send(500, TEXT, f"Error: internal error ({type(exc).__name__})\n")

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self._guarded(self._get)

    def do_POST(self) -> None:  # noqa: N802
        self._guarded(self._post)

    def _get(self) -> None:
        url = urlsplit(self.path)
        if url.path == "/api/plan":
            self._plan(parse_qsl(url.query, keep_blank_values=True))
        elif url.path == "/api/options":
            self._send(200, "application/json", json.dumps(options_schema()))
        elif url.path in ("/", "/index.html"):
            self._static("index.html")
        elif url.path == "/favicon.ico":
            self._send(204, "text/plain", b"")
        elif url.path.startswith("/static/"):
            self._static(url.path.removeprefix("/static/"))
        else:
            self._send(404, TEXT, "Error: not found\n")

    def _waiter(self, channel: str = "", ticket: int = -1, seconds: float | None = None) -> Waiter:
        return Waiter(self.server, self.connection, channel, ticket, self.started, seconds)

    def handle_one_request(self) -> None:
        self.started = time.monotonic()
        super().handle_one_request()

    def _plan(self, pairs: list[tuple[str, str]]) -> None:
        channel = self.headers.get("X-Lora-Plan-Channel", "")[:100]
        ticket = self.server.enter_channel(channel)
        try:
            self._plan_in_channel(pairs, channel, ticket)
        finally:
            self.server.leave_channel(channel, ticket)

    def _plan_in_channel(self, pairs: list[tuple[str, str]], channel: str, ticket: int) -> None:
        args = query_to_args(pairs)
        shown = [a for opt, value in args for a in (opt, value) if a is not None]
        # headers are latin-1: the command is percent-encoded, all of printable ASCII but % kept
        headers = {"X-Lora-Plan-Command": quote(command_line(shown), safe=_PRINTABLE)}
        args = with_format(args)
        try:
            params = parse_params(parse_argv(args))
            check_model(params.get("model_name"))
            heavy = check_budget(params, self.server.limits)
            model = params.get("model_name") or ""
            token = model if UPLOAD_TOKEN.fullmatch(model) else None
            seconds = None
            if token:  # the worker reads the server's own copy; the answer names the token
                folder = str(self.server.upload_path(token))
                args = [(opt, folder if opt == "--model" and value == token else value)
                        for opt, value in args]
                if _recorded_upload(Path(folder) / "config.json"):
                    limits = self.server.limits
                    heavy, seconds = True, max(limits.seconds, limits.recorded_seconds)
            status, body = self.server.run_plan(parse_argv(args), heavy,
                                                self._waiter(channel, ticket, seconds))
        except Refused as exc:
            self._send(exc.status, TEXT, str(exc), headers)
            return
        if token:
            body = body.replace(folder, token)
        fmt = params.get("fmt")
        json_out = status == 200 and fmt == "json"  # --explain with JSON is inside it (`explain`)
        self._send(status, "application/json" if json_out else TEXT, body, headers)

    def _static(self, name: str) -> None:
        suffix = Path(name).suffix
        if "/" in name or name.startswith(".") or suffix not in STATIC_TYPES:
            self._send(404, TEXT, "Error: not found\n")
            return
        resource = resources.files("lora_planner.cli").joinpath("static", name)
        if not resource.is_file():
            self._send(404, TEXT, "Error: not found\n")
            return
        self._send(200, STATIC_TYPES[suffix], resource.read_bytes())

    def _content_length(self) -> int:
        """The body's declared size: one non-negative integer no larger than the cap."""
        if self.headers.get("Transfer-Encoding"):
            raise Refused(411, "Error: send the upload with a Content-Length, not chunked\n")
        values = {v.strip() for v in self.headers.get_all("Content-Length") or []}
        if not values:
            raise Refused(411, "Error: an upload needs a Content-Length\n")
        if len(values) > 1 or not re.fullmatch(r"\d{1,18}", next(iter(values))):
            raise Refused(400, "Error: Content-Length must be one whole number of bytes\n")
        length = int(next(iter(values)))
        if length > MAX_CONFIG_BYTES:
            self._send(413, TEXT, f"Error: a config.json is a few kB; this upload is {length:,} bytes "
                                  f"(at most {MAX_CONFIG_BYTES:,})\n", {"Connection": "close"})
            self.close_connection = True
            if length <= DRAIN_BYTES:  # read and drop it, so the client reads the answer, not a reset
                try:
                    self._read(length, keep=False)
                except Refused:
                    pass
            raise ClientGone  # answered already
        return length

    def _read(self, length: int, keep: bool = True) -> bytes:
        """`length` bytes of body within the idle time, however slowly they come."""
        deadline = time.monotonic() + self.server.limits.idle_seconds
        chunks, left = [], length
        while left:
            if time.monotonic() > deadline:
                raise Refused(408, "Error: the upload took too long\n")
            try:
                chunk = self.rfile.read1(min(left, 1 << 16))
            except OSError:
                chunk = b""
            if not chunk:
                raise Refused(400, f"Error: the upload ended after {length - left:,} of {length:,} bytes\n")
            left -= len(chunk)
            if keep:
                chunks.append(chunk)
        return b"".join(chunks)

    def _post(self) -> None:
        from ..errors import PlanError

        url = urlsplit(self.path)
        if url.path != "/api/config":
            self._send(404, TEXT, "Error: not found\n")
            return
        data = self._read(self._content_length())
        if self.headers.get("Content-Type", "").lower().startswith("multipart/form-data"):
            self._send(400, TEXT, f"Error: {form_upload_hint(self.headers.get('Host', ''))}\n")
            return
        filename = dict(parse_qsl(url.query)).get("filename", "")
        try:
            token = self._save_config(data, filename)
        except PlanError as exc:
            self._send(400, TEXT, f"Error: {exc}\n")
            return
        self._send(200, "application/json", json.dumps({"model": token}))

    def _save_config(self, data: bytes, filename: str) -> str:
        """Keep an upload under the server's folder, named by its content's hash (the same upload
        gets the same token) and its model name; check it exactly as `lora-plan --model PATH`
        checks it, in a worker; answer its token."""
        from ..errors import PlanError

        name = upload_name(data, filename)
        digest = hashlib.sha256(data).hexdigest()[:12]
        target = self.server.uploads / digest / name
        target.mkdir(parents=True, exist_ok=True)
        write_atomically(target / "config.json", data)
        # another model_type is checked against transformers, which the worker may import first
        limits = self.server.limits
        seconds = max(limits.seconds, limits.recorded_seconds) if _recorded_upload(target / "config.json") \
            else None
        problem = self.server.check_config(str(target), self._waiter(seconds=seconds))
        if problem is not None:
            shutil.rmtree(target, ignore_errors=True)
            # a message that names the file names it as the user knows it, not our temporary copy
            shown = filename or "config.json"
            raise PlanError(problem.replace(str(target / "config.json"), shown).replace(str(target), shown))
        return f"upload:{digest}/{name}"


def _hostname(netloc: str) -> str | None:
    """`[::1]:8765` -> `::1`, `localhost:1` -> `localhost`; None when it does not parse."""
    try:
        return urlsplit("//" + netloc).hostname
    except ValueError:
        return None


def _netloc(netloc: str, scheme: str) -> tuple[str | None, int | None]:
    """(host, port) with the scheme's default port filled in, for comparing origins."""
    try:
        url = urlsplit("//" + netloc)
        return url.hostname, url.port or (443 if scheme == "https" else 80)
    except ValueError:
        return None, None


# --- binding -----------------------------------------------------------------------------------


def bind_addresses(host: str) -> list[str]:
    """The addresses `host` binds: '' and 0.0.0.0 / :: are every address of this machine."""
    if host in ("", "0.0.0.0", "::"):
        return [host or "0.0.0.0"]
    try:
        return sorted({info[4][0] for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)})
    except (socket.gaierror, UnicodeError):
        return [host]


def is_loopback(host: str) -> bool:
    """Whether binding `host` answers this machine only."""
    def loop(address: str) -> bool:
        try:
            return ipaddress.ip_address(address.split("%")[0]).is_loopback
        except ValueError:
            return False

    return all(loop(a) for a in bind_addresses(host))


def machine_addresses() -> list[str]:
    """This machine's own addresses, as another machine would reach them (best effort)."""
    found: set[str] = set()
    try:
        found |= {info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None)}
    except (socket.gaierror, UnicodeError):
        pass
    for family, probe in ((socket.AF_INET, "192.0.2.1"), (socket.AF_INET6, "2001:db8::1")):
        try:  # the address a route out would use; a UDP connect sends nothing
            with socket.socket(family, socket.SOCK_DGRAM) as s:
                s.connect((probe, 9))
                found.add(s.getsockname()[0])
        except OSError:
            pass
    return sorted(a for a in found if not ipaddress.ip_address(a.split("%")[0]).is_loopback)


def allowed_hosts(host: str, extra: tuple[str, ...] = ()) -> frozenset[str]:
    """Host names the server answers to: loopback, the address it is bound to (every address of
    this machine when bound to all), and what the user adds."""
    names = set(LOOPBACK) | {h.strip().lower().strip("[]") for h in extra if h.strip()}
    if not is_loopback(host):
        bound = bind_addresses(host)
        wildcard = bound in (["0.0.0.0"], ["::"])
        names |= set(machine_addresses()) if wildcard else {*bound, host.lower()}
    return frozenset(names)


def make_server(host: str = "127.0.0.1", port: int = DEFAULT_PORT, upload_dir: Path | None = None,
                verbose: bool = False, limits: Limits | None = None,
                allow_hosts: tuple[str, ...] = ()) -> PlanServer:
    """A server ready for `serve_forever()`; port 0 picks a free one (`server.server_address`).
    Uploads and the workers' empty working folder go under `upload_dir`, else a temporary folder
    that `server_close()` removes. Binding beyond loopback is the caller's decision (`serve`
    asks for --allow-remote)."""
    owns = upload_dir is None
    root = Path(tempfile.mkdtemp(prefix="lora-plan-serve-")) if owns else Path(upload_dir)
    return PlanServer((host, port), limits or Limits(), root, owns, allowed_hosts(host, allow_hosts),
                      verbose)


@click.command("serve")
@click.option("--port", type=click.IntRange(0, 65535), default=DEFAULT_PORT, show_default=True,
              help="Port to listen on (0: any free port).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind. The default answers this machine only; any other needs "
                   "--allow-remote.")
@click.option("--allow-remote", is_flag=True,
              help="Let --host be an address other machines reach: anyone who can reach it can "
                   "plan and upload configs, without a password. See SECURITY.md.")
@click.option("--allow-host", "allow_host", multiple=True, metavar="NAME",
              help="Also answer requests addressed to this host name (a proxy's or tunnel's name); "
                   "repeatable. Loopback names and the bound address are always allowed.")
@click.option("--workers", type=click.IntRange(1, 64), default=Limits.workers, show_default=True,
              help="Worker processes that plan (one is kept for cheap plans when more than one).")
@click.option("--time-limit", "time_limit", type=click.FloatRange(0.1, 600), default=Limits.seconds,
              show_default=True, help="Seconds one request may take; its worker is stopped past it.")
@click.option("--record-time-limit", "record_time_limit", type=click.FloatRange(0.1, 3600),
              default=Limits.recorded_seconds, show_default=True,
              help="Seconds a plan of an uploaded config.json of another model_type may take: its step "
                   "is recorded from transformers the first time (cached after).")
@click.option("--open", "open_browser", is_flag=True, help="Open the page in the default browser.")
@click.option("--verbose", is_flag=True, help="Log every request.")
def serve_command(port: int, host: str, allow_remote: bool, allow_host: tuple[str, ...], workers: int,
                  time_limit: float, open_browser: bool, verbose: bool,
                  record_time_limit: float = Limits.recorded_seconds) -> None:
    """Serve a local page to click through a plan: a form for every `plan` option, memory by term
    against the GPU's capacity, GPUs, checkpoints, the derivation, and the matching command line.

    \b
        lora-plan serve --open
        curl 'http://127.0.0.1:8765/api/plan?model=8b&method=lora&rank=16'
    """
    import signal

    from .common import UserError

    if not is_loopback(host) and not allow_remote:
        raise UserError(f"--host {host!r} answers other machines too; add --allow-remote to mean it "
                        "(see SECURITY.md), or use an SSH tunnel to 127.0.0.1")
    try:
        server = make_server(host, port, verbose=verbose, allow_hosts=allow_host,
                             limits=Limits(seconds=time_limit, workers=workers,
                                           recorded_seconds=record_time_limit))
    except OSError as exc:
        import errno

        hint = ("; is another `lora-plan serve` running? try --port 0 for any free port"
                if exc.errno == errno.EADDRINUSE else "")
        raise UserError(f"cannot listen on {host}:{port}: {exc.strerror or exc}{hint}") from None
    try:
        bound_host, bound_port = server.server_address[:2]
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        url = f"http://{'127.0.0.1' if bound_host in ('0.0.0.0', '::') else shown}:{bound_port}/"
        if not is_loopback(host):
            reach = sorted(server.allowed_hosts - set(LOOPBACK) - {h.lower() for h in allow_host})
            where = ", ".join(f"http://{f'[{a}]' if ':' in a else a}:{bound_port}/" for a in reach)
            click.echo(f"warning: other machines reach this page at {where or 'this machine addresses'}: "
                       "anyone who can reach it can plan and upload configs, without a password "
                       "(see SECURITY.md)", err=True)
        click.echo(f"lora-plan serving {url}  (Ctrl+C to stop)")
        if open_browser:
            import webbrowser

            webbrowser.open(url)

        def stop(signum, frame):
            raise KeyboardInterrupt

        # a service manager's stop, or the terminal closing, cleans up as Ctrl+C does
        for name in ("SIGTERM", "SIGHUP"):
            if hasattr(signal, name):
                signal.signal(getattr(signal, name), stop)
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        # a second Ctrl+C or SIGTERM must not cut the cleanup short (it takes at most seconds)
        for name in ("SIGINT", "SIGTERM", "SIGHUP"):
            if hasattr(signal, name):
                signal.signal(getattr(signal, name), signal.SIG_IGN)
        server.server_close()
