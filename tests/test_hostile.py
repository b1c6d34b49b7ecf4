"""Hostile input to every command: an error is one line and exit 2, never a traceback, and quick.

The cases are generated from the commands' own click parameters, so a new option is driven as
soon as it exists: each case is a command with cheap valid arguments and one (or two) of its
parameters set to a hostile value (NaN, infinities, huge and negative numbers, empty and long
strings, unicode, control characters, bad regexes, JSON of the wrong type, paths to devices,
to files outside the folder, to malformed configs and adapters). Config fields and adapter-config
fields get the same treatment through files. A run must exit 0 (the value was valid; then no
NaN or infinity is printed as a number) or 2 with one line starting `Error:`, with no traceback,
within 5 seconds.

Nothing trains and nothing leaves the machine: `measure run` and `trace` reach their checks and
then a stub in place of the training step; `measure sweep` is run with --dry-run and a stub in
place of the sweep; the hub is unreachable. `serve` is left out (it would start a server); the
page parses with `plan`'s own options, which are driven here.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import shutil
import signal
import time
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lora_planner.cli import main
from lora_planner.errors import PlanError

REPO = Path(__file__).resolve().parents[1]
SECONDS = 5.0  # CPU seconds per case
REPORT_SECONDS = 20.0  # a report that is written, plots and all
SKIPPED_COMMANDS = {("serve",)}

# ---------------------------------------------------------------------------------------------
# Hostile values


NUMBERS = ["nan", "NaN", "-nan", "inf", "-inf", "Infinity", "1e308", "1e300", "-1e308", "1e19",
           str(10**19), "9" * 400, "9" * 5000, "-1", "0", "-0", "0.0", "1e-320", "2.5", "1", "8",
           "0x10", "1_000", "1e9", "1B", "1e300B", "80GB", "1B", "0GB", "1e400GB", "٣", "８", "1e", "+"]
TEXTS = ["", " ", "é", "a/é", "a/b c", "a/b", "x" * 10_000, "\x00", "a\nb", "\t", "-", "--", ",",
         ",,,", "1,2,3", "0,1", ",".join(map(str, range(1, 200))), "re:(", "re:" + "(" * 1000,
         "re:.*", "re:(a*)*b", "[1, 2]", "{}", "null", "true", "all-linear", "default", "h100", "8b",
         "gpt2", "1/0", "0/0", "3/2", "-1/2", "rank=1,2", "model=gpt2", "steps=nan", "rank=", "=",
         "x=y", "seq_len=1000000000000", "batch_size=1e300", "alpha=nan", "lr=inf", "seed=-1",
         "model=/proc/self/mem", "😀" * 10,
         "model.layers.0.self_attn.q_proj", "a" * 300]
# Paths to read, relative to the scratch folder the cases run in (see `scratch`).
READ_PATHS = ["adapters/good", "adapters/nan", "adapters/inf", "adapters/r0", "adapters/alpha_x",
              "adapters/badpattern", "adapters/deeppattern", "adapters/listpattern",
              "adapters/nonutf8", "adapters/deep", "adapters/good/adapter_model.safetensors",
              "ckpt", "ckpt_nan", "idx_list", "idx_escape", "idx_abs", "idx_nonstr",
              "configs/heads0.json", "configs/deep.json", "configs/bytes.json", "configs/big.json",
              "configs/list.json", "configs/empty.json", "configs/mixtral_noexp.json",
              "records/bad.jsonl", "records/deep.jsonl", "empty_dir", "/proc/self/mem", "/dev/zero",
              "/dev/null", "/etc/passwd", "../../../../etc/passwd", ".", "nowhere.json", "nowhere/"]
# Paths to write: never outside the scratch folder (the suite may run as root).
WRITE_PATHS = ["", ".", "out/deep/x.md", "empty_dir", "configs/existing.json", "é.md", "a\nb.md",
               "x" * 300, "/dev/full", "out.md", "adapters/good"]
OUTPUT_OPTIONS = {"-o", "--output", "--save-adapter"}

hostile_text = st.one_of(
    st.sampled_from(NUMBERS + TEXTS + READ_PATHS),
    st.text(max_size=30),
    st.integers().map(str),
    st.floats().map(repr),
)


# ---------------------------------------------------------------------------------------------
# The commands and their parameters


def leaf_commands() -> list[tuple[tuple[str, ...], click.Command]]:
    ctx = click.Context(main)
    found = []

    def walk(command: click.Command, path: tuple[str, ...]) -> None:
        if isinstance(command, click.Group):
            for name in command.list_commands(ctx):
                walk(command.get_command(ctx, name), (*path, name))
        elif path not in SKIPPED_COMMANDS:
            found.append((path, command))

    walk(main, ())
    return found


# Cheap valid arguments that take each command to its checks (and no further than a stub).
BASE: dict[tuple[str, ...], list[str]] = {
    ("plan",): ["--model", "gpt2"],
    ("models",): [],
    ("trace",): ["--model", "gpt2", "--layers", "1", "--seq-len", "16"],
    ("measure", "run"): ["--model", "gpt2", "--steps", "1", "--seq-len", "16", "--device", "cpu"],
    ("measure", "sweep"): ["--set", "model=gpt2", "--output", "sweep.jsonl", "--dry-run", "--no-progress"],
    ("report", "capacity"): ["--models", "gpt2", "--output", "capacity.md"],
    ("report", "validation"): ["--output", "validation.md", "--", "records/good.jsonl"],
    ("report", "adapter"): ["--output", "adapters.md", "--", "adapters/good"],
    ("adapter", "analyze"): ["--", "adapters/good"],
    ("adapter", "resize"): ["--rank", "1", "--output", "resized", "--", "adapters/good"],
    ("adapter", "diff"): ["--", "ckpt", "ckpt"],
}


def name_of(param: click.Parameter) -> str:
    return max(param.opts, key=len) if isinstance(param, click.Option) else param.name


def parameters() -> list[tuple[tuple[str, ...], click.Parameter]]:
    return [(path, p) for path, command in leaf_commands() for p in command.params
            if not (isinstance(p, click.Option) and (p.hidden or name_of(p) in ("--help", "--version")))]


def values_for(param: click.Parameter) -> st.SearchStrategy:
    if isinstance(param, click.Option) and param.is_flag:
        return st.just(None)
    if isinstance(param, click.Option) and OUTPUT_OPTIONS & set(param.opts):
        return st.sampled_from(WRITE_PATHS)
    if isinstance(param.type, click.Choice):
        return st.one_of(st.sampled_from([str(c) for c in param.type.choices]), hostile_text)
    return hostile_text


def with_value(path: tuple[str, ...], param: click.Parameter, value, other=()) -> list[str]:
    """argv: the command, its base arguments with this parameter's replaced, then the value (as
    --opt=value, so a value is never read as another option; positionals after `--`)."""
    base = BASE[path] if path != ("plan",) or name_of(param) != "--params" else []
    options, positionals = base, []
    if "--" in base:
        i = base.index("--")
        options, positionals = base[:i], base[i + 1:]
    if isinstance(param, click.Option):
        names = set(param.opts) | set(param.secondary_opts)
        kept, skip = [], False
        for token in options:
            if skip:
                skip = False
                continue
            if token in names:
                skip = not param.is_flag
                continue
            kept.append(token)
        if param.is_flag:
            added = [name_of(param)]
        elif param.nargs == 2:
            added = [name_of(param), value, value]
        else:
            added = [f"{name_of(param)}={value}"]
        return [*path, *kept, *added, *other, *(["--", *positionals] if positionals else [])]
    # a positional: replace the first (or the only) one
    index = [p for p in path_command(path).params if not isinstance(p, click.Option)].index(param)
    positionals = list(positionals) or [""]
    while len(positionals) <= index:
        positionals.append(positionals[-1])
    positionals[index] = value
    return [*path, *options, *other, "--", *positionals]


def path_command(path: tuple[str, ...]) -> click.Command:
    return dict(leaf_commands())[path]


# ---------------------------------------------------------------------------------------------
# The scratch folder: malformed configs, adapters, checkpoints and records to point at


def _write_adapter(folder: Path, config: dict | None = None, raw: bytes | None = None, a=None, b=None):
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4, 16, generator=g) if a is None else a
    b = torch.randn(16, 4, generator=g) if b is None else b
    save_file({"base_model.model.transformer.h.0.attn.c_attn.lora_A.weight": a.contiguous(),
               "base_model.model.transformer.h.0.attn.c_attn.lora_B.weight": b.contiguous()},
              str(folder / "adapter_model.safetensors"))
    text = raw if raw is not None else json.dumps(
        {"peft_type": "LORA", "r": 4, "lora_alpha": 8, **(config or {})}).encode()
    (folder / "adapter_config.json").write_bytes(text)
    return folder


LLAMA = {"model_type": "llama", "vocab_size": 512, "hidden_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128,
         "max_position_embeddings": 256}


def build_scratch(root: Path) -> None:
    import torch
    from safetensors.torch import save_file

    nan = torch.randn(4, 16)
    nan[0, 0] = float("nan")
    inf = torch.randn(16, 4)
    inf[1, 1] = float("inf")
    _write_adapter(root / "adapters/good")
    _write_adapter(root / "adapters/nan", a=nan)
    _write_adapter(root / "adapters/inf", b=inf)
    _write_adapter(root / "adapters/r0", {"r": 0})
    _write_adapter(root / "adapters/alpha0", {"lora_alpha": 0})
    _write_adapter(root / "adapters/alpha_huge", {"lora_alpha": 1e153})
    _write_adapter(root / "adapters/alpha_x", {"lora_alpha": "x"})
    _write_adapter(root / "adapters/badpattern", {"rank_pattern": {"(": 4}})
    _write_adapter(root / "adapters/deeppattern", {"rank_pattern": {"(" * 1000: 4}})
    _write_adapter(root / "adapters/listpattern", {"rank_pattern": [1, 2]})
    _write_adapter(root / "adapters/nonutf8", raw=b'{"r": 4, "lora_alpha": "\xff"}')
    _write_adapter(root / "adapters/deep", raw=b"[" * 100_000 + b"]" * 100_000)
    for name, weight in (("ckpt", torch.randn(8, 8)), ("ckpt_nan", torch.full((8, 8), float("nan")))):
        (root / name).mkdir()
        save_file({"w": weight}, str(root / name / "model.safetensors"))
    for name, index in {"idx_list": {"weight_map": [1, 2]},
                        "idx_escape": {"weight_map": {"w": "../../../../etc/passwd"}},
                        "idx_abs": {"weight_map": {"w": "/etc/passwd"}},
                        "idx_nonstr": {"weight_map": {"w": 3}}}.items():
        (root / name).mkdir()
        (root / name / "model.safetensors.index.json").write_text(json.dumps(index))
    configs = root / "configs"
    configs.mkdir()
    (configs / "heads0.json").write_text(json.dumps({**LLAMA, "num_attention_heads": 0}))
    (configs / "mixtral_noexp.json").write_text(json.dumps({**LLAMA, "model_type": "mixtral"}))
    (configs / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    (configs / "bytes.json").write_bytes(b'{"model_type": "ll\xffama"}')
    (configs / "big.json").write_text(json.dumps({**LLAMA, "pad": "x" * 5 * 2**20}))
    (configs / "list.json").write_text("[1, 2]")
    (configs / "empty.json").write_text("")
    # an existing file for the cases to overwrite: never one the fixed cases read back
    (configs / "existing.json").write_text(json.dumps(LLAMA))
    records = root / "records"
    records.mkdir()
    shutil.copy(REPO / "results/measure/cpu-tiny-gpt2.jsonl", records / "good.jsonl")
    (records / "bad.jsonl").write_bytes(b'\xff{"x": 1}\n{"measured": "x"}\n[[[[1]]]]\n')
    (records / "deep.jsonl").write_text("[" * 100_000 + "]" * 100_000 + "\n")
    (root / "empty_dir").mkdir()


@contextlib.contextmanager
def _memory_cap(extra: int):
    """At most `extra` bytes more heap for the process while the cases run: a reader that slurps
    /dev/zero or /dev/full fails its case with a MemoryError instead of taking the machine's memory."""
    try:
        import resource

        status = Path("/proc/self/status").read_text()
        used = int(re.search(r"VmData:\s+(\d+) kB", status)[1]) * 1024
        soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    except (ImportError, OSError, TypeError):
        yield
        return
    cap = used + extra if hard == resource.RLIM_INFINITY else min(used + extra, hard)
    resource.setrlimit(resource.RLIMIT_DATA, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_DATA, (soft, hard))


def _non_finite(value, depth: int = 0) -> bool:
    """Whether a NaN or an infinity hides in a job, a setup or a spec (their fields, one level of
    nesting in dicts, lists and dataclasses)."""
    import dataclasses

    if isinstance(value, float):
        return not math.isfinite(value)
    if depth > 3:
        return False
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return any(_non_finite(getattr(value, f.name), depth + 1) for f in dataclasses.fields(value))
    if isinstance(value, dict):
        return any(_non_finite(v, depth + 1) for v in value.values())
    if isinstance(value, list | tuple):
        return any(_non_finite(v, depth + 1) for v in value)
    return False


def _stub(*args, **kwargs):
    """In place of training, tracing and sweeping: what reaches it passed every check, so it must
    hold no NaN or infinity (a setting that would have trained with one fails the case)."""
    assert not _non_finite([*args, *kwargs.values()]), f"non-finite value reached the job: {args}"
    raise PlanError("stub: this test never trains or traces")


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """Run every case inside a scratch folder of malformed inputs, with the training step, the
    trace, the sweep and the network stubbed out; modules that import torch are loaded first so
    that the first case is not charged for the import."""
    import urllib.error
    import urllib.request

    pytest.importorskip("torch")
    import lora_planner.measure.job  # noqa: F401
    import lora_planner.measure.sweep  # noqa: F401
    import lora_planner.measure.traced_step  # noqa: F401

    root = tmp_path_factory.mktemp("hostile")
    build_scratch(root)

    def offline(*_, **__):
        raise urllib.error.URLError("offline in tests")

    with pytest.MonkeyPatch.context() as mp, _memory_cap(2 * 2**30):
        mp.chdir(root)
        mp.setattr(urllib.request, "urlopen", offline)
        mp.setattr("lora_planner.measure.job.run_job", _stub)
        mp.setattr("lora_planner.measure.traced_step.trace", _stub)
        mp.setattr("lora_planner.measure.sweep.run_sweep", _stub)
        TIMES.clear()
        yield root
        if TIMES:
            seconds, slowest = max(TIMES)
            print(f"\nhostile cases: {len(TIMES)}; slowest {seconds:.2f} s: {slowest}")


TIMES: list[tuple[float, str]] = []  # (seconds, argv) of every case run
_NUMBER_WORD = re.compile(r"(?<![\w.'\"-])[-+]?(nan|inf|infinity)(?![\w'\"])", re.IGNORECASE)


class _Overtime(Exception):
    pass


def _alarm(*_):
    raise _Overtime("case ran past 30 s")


def _run(argv: list[str]):
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(30)
    start = time.process_time()
    try:
        result = CliRunner().invoke(main, argv)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    # CPU seconds of this process: the work one input costs, not the other jobs on a shared machine
    return result, time.process_time() - start


def invoke(argv: list[str]):
    """Run one case; the result and the CPU seconds it took. A hang is cut at 30 s of wall time
    (and fails). A case over the time limit runs once more and keeps the faster time, so that a
    burst of paging on a busy machine does not fail it; work that is really slow is slow twice."""
    result, elapsed = _run(argv)
    if elapsed >= SECONDS and not isinstance(result.exception, _Overtime):
        result, again = _run(argv)
        elapsed = min(elapsed, again)
    TIMES.append((elapsed, repr(argv)[:300]))
    return result, elapsed


def check(argv: list[str], result, elapsed: float) -> None:
    """Exit 0, or exit 2 with one line `Error: ...`; no traceback; no NaN printed as a number; fast.
    (`report validation` keeps its own contract for unusable records files, exit 1.)"""
    shown = f"{argv!r}\n{result.output[-2000:]}"
    assert "Traceback" not in result.output, shown
    assert result.exception is None or isinstance(result.exception, SystemExit), \
        f"{shown}\n{result.exception!r}"
    # lines as a terminal shows them (str.splitlines would also break at \x1c-\x1e and \x85)
    lines = re.split(r"\r\n|\r|\n", result.output.strip())
    if result.exit_code == 1 and argv[:2] == ["report", "validation"]:
        # its contract: each unusable input is a warning line (and a row of the report), then
        # one `error:` line when none is left
        assert lines[-1].startswith("error: no usable record"), shown
        assert all(x.startswith(("warning:", "wrote ")) for x in lines[:-1]), shown
    elif result.exit_code == 2:
        assert len(lines) == 1 and lines[0].startswith("Error:"), shown
    else:
        assert result.exit_code == 0, f"exit {result.exit_code}: {shown}"
        assert not _NUMBER_WORD.search(result.output), shown
    # a report that answers draws its plots (matplotlib), seconds on a busy machine; every refusal
    # and every other answer must be quick
    limit = REPORT_SECONDS if result.exit_code == 0 and argv[0] == "report" else SECONDS
    assert elapsed < limit, f"{elapsed:.1f} s: {shown}"


# ---------------------------------------------------------------------------------------------
# Every option of every command


PARAMETERS = parameters()


@st.composite
def option_cases(draw) -> list[str]:
    path, param = draw(st.sampled_from(PARAMETERS))
    value = draw(values_for(param))
    other: list[str] = []
    if draw(st.booleans()):  # a second hostile option of the same command, now and then
        options = [p for q, p in PARAMETERS if q == path and isinstance(p, click.Option)
                   and p is not param and not (OUTPUT_OPTIONS & set(p.opts)) and p.nargs == 1]
        if options:
            second = draw(st.sampled_from(options))
            v = draw(values_for(second))
            other = [name_of(second)] if second.is_flag else [f"{name_of(second)}={v}"]
    return with_value(path, param, value, other)


def test_every_command_and_parameter_is_driven():
    commands = {path for path, _ in leaf_commands()}
    assert commands == set(BASE), "a new command needs its cheap valid arguments in BASE"
    assert len(PARAMETERS) > 150


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(argv=option_cases())
def test_hostile_option_values(scratch, argv):
    check(argv, *invoke(argv))


@pytest.mark.slow
@settings(max_examples=3000, deadline=None, suppress_health_check=list(HealthCheck))
@given(argv=option_cases())
def test_hostile_option_values_at_length(scratch, argv):
    check(argv, *invoke(argv))


def test_each_parameter_with_each_fixed_hostile_value_of_its_kind_is_quick(scratch):
    """Every parameter once with NaN, infinity, a huge number, empty text and a bad path: the
    sweep the random cases may miss."""
    failures = []
    for path, param in PARAMETERS:
        if isinstance(param, click.Option) and param.is_flag:
            cases = [None]
        elif isinstance(param, click.Option) and OUTPUT_OPTIONS & set(param.opts):
            cases = ["", "/dev/full", "empty_dir"]
        else:
            cases = ["nan", "inf", "9" * 400, "", "/proc/self/mem"]
        for value in cases:
            argv = with_value(path, param, value)
            try:
                check(argv, *invoke(argv))
            except AssertionError as exc:
                failures.append(str(exc).splitlines()[0][:300] + " | " + str(exc)[-300:].replace("\n", " "))
    assert not failures, f"{len(failures)} failures:\n" + "\n".join(failures)


# ---------------------------------------------------------------------------------------------
# Every config.json field


def _family_configs() -> dict[str, dict]:
    from lora_planner.catalog import CATALOG
    from lora_planner.spec import to_hf_config

    configs: dict[str, dict] = {}
    for spec in CATALOG:
        configs.setdefault(spec.family, to_hf_config(spec))
    configs["qwen2-window"] = {**configs["qwen2"], "use_sliding_window": True, "sliding_window": 512,
                               "max_window_layers": 2}
    return configs


class _Recording(dict):
    """A config dict that records every key the reader looks at."""

    seen: set[str]

    def get(self, key, default=None):
        self.seen.add(key)
        return super().get(key, default)

    def __getitem__(self, key):
        self.seen.add(key)
        return super().__getitem__(key)

    def __contains__(self, key):
        self.seen.add(key)
        return super().__contains__(key)


def config_fields() -> list[tuple[str, str]]:
    """(family, key) for every key `spec_from_hf_config` reads for each family: a field the reader
    starts to read is driven without a change here."""
    from lora_planner.spec import spec_from_hf_config

    fields = []
    for family, config in _family_configs().items():
        recording = _Recording(config)
        recording.seen = set()
        spec_from_hf_config(recording)
        fields += [(family, key) for key in sorted(recording.seen)]
    return fields


CONFIG_FIELDS = config_fields()
json_hostile = st.one_of(
    st.sampled_from([math.nan, math.inf, -math.inf, 1e19, 10**19, 10**400, 10**5, 257, 256, -1, 0,
                     2.5, 4096.0, "x", "", "1e3", "64", "é" * 100, [], {}, [[[[1]]]], None, True,
                     False, "true", {"a": 1}]),
    st.integers(), st.floats(), st.text(max_size=20),
    st.lists(st.integers(min_value=-5, max_value=5), max_size=3),
)


def _finite_json(text: str):
    def refuse(constant):
        raise AssertionError(f"{constant} in the plan's JSON")

    return json.loads(text, parse_constant=refuse)


def check_plan_json(argv, result) -> None:
    """A plan that answers says nothing impossible: every number finite, no negative size or count."""
    if result.exit_code != 0:
        return
    data = _finite_json(result.output)

    def walk(value, key=""):
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, k)
        elif isinstance(value, list):
            for v in value:
                walk(v, key)
        elif isinstance(value, int | float) and not isinstance(value, bool) and (
                key.endswith(("bytes", "params")) or key in ("peak", "gpus_needed")):
            assert value >= 0, f"{key} = {value}: {argv}"

    walk(data)


@st.composite
def config_cases(draw) -> tuple[dict, str]:
    family, key = draw(st.sampled_from(CONFIG_FIELDS))
    config = dict(_family_configs()[family])
    action = draw(st.sampled_from(["set", "set", "set", "delete"]))
    if action == "delete":
        config.pop(key, None)
    else:
        config[key] = draw(json_hostile)
    if draw(st.booleans()):  # a second field of the same family
        other_family_keys = [k for f, k in CONFIG_FIELDS if f == family and k != key]
        config[draw(st.sampled_from(other_family_keys))] = draw(json_hostile)
    return config, f"{family}.{key}"


@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
@given(case=config_cases(), fit=st.booleans())
def test_hostile_config_fields(scratch, case, fit):
    config, _ = case
    path = scratch / "hostile-config.json"
    path.write_text(json.dumps(config))
    argv = ["plan", "--model", str(path), "--format", "json", *(["--fit"] if fit else [])]
    result, elapsed = invoke(argv)
    check(argv + [json.dumps(config)[:300]], result, elapsed)
    check_plan_json(argv, result)


@pytest.mark.slow
@settings(max_examples=2000, deadline=None, suppress_health_check=list(HealthCheck))
@given(case=config_cases(), fit=st.booleans())
def test_hostile_config_fields_at_length(scratch, case, fit):
    test_hostile_config_fields.hypothesis.inner_test(scratch, case, fit)


ADAPTER_FIELDS = ["r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "peft_type"]
adapter_hostile = st.one_of(
    json_hostile,
    st.dictionaries(st.sampled_from(["c_attn", "(", "(" * 500, ".*", "h\\.0\\..*", "[", ""]),
                    json_hostile, max_size=2),
)


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(key=st.sampled_from(ADAPTER_FIELDS), value=adapter_hostile,
       verb=st.sampled_from(["analyze", "resize"]))
def test_hostile_adapter_config_fields(scratch, key, value, verb):
    folder = scratch / "adapters/hostile"
    _write_adapter(folder, {key: value})
    argv = ["adapter", verb, str(folder)]
    if verb == "resize":
        argv += ["--energy", "0.5", "--output", str(scratch / "resized-hostile")]
    result, elapsed = invoke(argv)
    check(argv + [json.dumps({key: value})[:300]], result, elapsed)


# ---------------------------------------------------------------------------------------------
# The inputs that failed before, by name


REGRESSIONS = {
    "epochs nan": (["--model", "gpt2", "--dataset-tokens", "1e9", "--epochs", "nan"], "--epochs"),
    "epochs inf": (["--model", "gpt2", "--dataset-tokens", "1e9", "--epochs", "inf"], "--epochs"),
    "tokens 1e300": (["--model", "gpt2", "--tokens", "1e300"], "--tokens"),
    "price 1e308": (["--model", "gpt2", "--tokens", "1e9", "--price", "1e308"], "--price"),
    "price nan": (["--model", "gpt2", "--tokens", "1e9", "--price", "nan"], "--price"),
    "dropout nan": (["--model", "gpt2", "--dropout", "nan"], "--dropout"),
    "lora dropout nan": (["--model", "gpt2", "--lora-dropout", "nan"], "--lora-dropout"),
    "gpu-mem 1B": (["--model", "gpt2", "--gpu-mem", "1B"], "--gpu-mem 1B"),
    "5,000 ranks": (["--model", "gpt2", "--rank", ",".join(map(str, range(1, 5001)))], "5,000 ranks"),
    "rank 0 and words": (["--model", "gpt2", "--rank", "0,x,-3"], "0, x, -3"),
    "nested regex target": (["--model", "gpt2", "--targets", "re:" + "(" * 1000], "nested too deeply"),
    "hub id with é": (["--model", "a/é"], "not a hub id"),
    "hub id with a space": (["--model", "a/b c"], "not a hub id"),
    "/proc/self/mem": (["--model", "/proc/self/mem"], "cannot read"),
    "heads 0": (["--model", "configs/heads0.json"], "num_attention_heads"),
    "deep nesting": (["--model", "configs/deep.json"], "nested too deeply"),
    "non-UTF-8 config": (["--model", "configs/bytes.json"], "not UTF-8"),
    "config of 5 MiB": (["--model", "configs/big.json"], "larger than"),
    "trace seq-len 10^12": (["trace", "--model", "gpt2", "--fake", "--seq-len", str(10**12)], "--seq-len"),
    "adapter NaN factor": (["adapter", "analyze", "adapters/nan"], "NaN or infinite"),
    "adapter inf factor": (["adapter", "analyze", "adapters/inf"], "NaN or infinite"),
    "adapter r 0": (["adapter", "analyze", "adapters/r0"], "r must be"),
    "adapter alpha x": (["adapter", "analyze", "adapters/alpha_x"], "lora_alpha"),
    "adapter bad rank_pattern": (["adapter", "analyze", "adapters/badpattern"], "rank_pattern key"),
    "adapter non-UTF-8 config": (["adapter", "analyze", "adapters/nonutf8"], "not UTF-8"),
    "index weight_map list": (["adapter", "diff", "ckpt", "idx_list"], "weight_map"),
    "index escapes folder": (["adapter", "diff", "ckpt", "idx_escape"], "not a .safetensors file in"),
    "diff of NaN": (["adapter", "diff", "ckpt", "ckpt_nan"], "NaN or infinite"),
    # found by the cases above
    "measure run alpha nan": (["measure", "run", "--model", "gpt2", "--alpha", "nan"], "alpha"),
    "sweep --set lr=inf": (["measure", "sweep", "--set", "model=gpt2", "--set", "lr=inf", "--output",
                            "sweep.jsonl", "--dry-run"], "lr"),
    "sweep timeout nan": (["measure", "sweep", "--set", "model=gpt2", "--output", "sweep.jsonl",
                           "--dry-run", "--timeout", "nan"], "--timeout"),
    "tflops inf": (["--model", "gpt2", "--tokens", "1e9", "--tflops", "inf"], "--tflops"),
    "keep nan": (["adapter", "analyze", "adapters/good", "--keep", "nan"], "--keep"),
    "price file /proc/self/mem": (["--model", "gpt2", "--tokens", "1e9", "--price-file", "/proc/self/mem"],
                                  "cannot read"),
    "price file name too long": (["--model", "gpt2", "--tokens", "1e9", "--price-file", "9" * 400],
                                 "no price file"),
    "report to an empty name": (["report", "capacity", "--models", "gpt2", "--output", ""], "file name"),
    "report ranks past any width": (["report", "capacity", "--models", "gpt2", "--ranks", "9" * 400,
                                     "--output", "c.md"], "rank"),
    "resize at lora_alpha 0": (["adapter", "resize", "adapters/alpha0", "--rank", "1", "--output", "r0"],
                               "lora_alpha above 0"),
    "lora_alpha 1e153": (["adapter", "analyze", "adapters/alpha_huge"], "lora_alpha"),
    "a line break in a name": (["--model", "a\nb.json"], "a\\nb.json"),
}


@pytest.mark.parametrize("argv,fragment", REGRESSIONS.values(), ids=list(REGRESSIONS))
def test_inputs_that_failed_before_are_one_line_errors(scratch, argv, fragment):
    result, elapsed = invoke(argv)
    check(argv, result, elapsed)
    assert result.exit_code == 2 and fragment in result.output, result.output


CONFIG_REGRESSIONS = {
    "layers 10^19": ({"num_hidden_layers": 10**19}, "num_hidden_layers"),
    "layers 10^5": ({"num_hidden_layers": 10**5}, "num_hidden_layers"),
    "Infinity": ({"hidden_size": math.inf}, "hidden_size"),
    "NaN": ({"intermediate_size": math.nan}, "intermediate_size"),
    "1e19": ({"vocab_size": 1e19}, "vocab_size"),
    "model_type a list": ({"model_type": ["llama"]}, "model_type"),
    "negative experts": ({"model_type": "mixtral", "num_local_experts": -4}, "num_local_experts"),
    "top-k above experts": ({"model_type": "mixtral", "num_local_experts": 4, "num_experts_per_tok": 9},
                            "num_experts_per_tok"),
    "negative sliding window": ({"model_type": "mistral", "sliding_window": -5}, "sliding_window"),
    "kv heads not dividing": ({"num_key_value_heads": 3}, "num_key_value_heads"),
    "a string size": ({"num_hidden_layers": "2"}, "num_hidden_layers"),
    "a bool size": ({"hidden_size": True}, "hidden_size"),
    "dropout a string": ({"attention_dropout": "x"}, "attention_dropout"),
}


@pytest.mark.parametrize("changes,field", CONFIG_REGRESSIONS.values(), ids=list(CONFIG_REGRESSIONS))
def test_config_values_that_planned_before_are_refused_naming_the_field(scratch, changes, field):
    path = scratch / "regression.json"
    path.write_text(json.dumps({**LLAMA, **changes}))
    result, elapsed = invoke(["--model", str(path)])
    check(["--model", str(path)], result, elapsed)
    assert result.exit_code == 2 and field in result.output, result.output


def test_mixtral_without_expert_counts_takes_the_config_class_defaults(scratch):
    """MixtralConfig's num_local_experts 8 and num_experts_per_tok 2, as transformers builds it
    (it divided by zero before)."""
    transformers = pytest.importorskip("transformers")
    from lora_planner.spec import spec_from_hf_config

    spec = spec_from_hf_config({**LLAMA, "model_type": "mixtral"})
    default = transformers.MixtralConfig()
    assert (spec.num_experts, spec.experts_per_token) == (default.num_local_experts,
                                                          default.num_experts_per_tok)
