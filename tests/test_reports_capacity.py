"""`lora-plan report capacity`: the markdown is read back and every number compared with the
planner's JSON for the same settings."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from lora_planner.cli import main
from lora_planner.reports.capacity import SUMMARY_COLUMNS, Column, summary_frame

from .markdown_doc import (
    assert_images_are_png,
    assert_size_matches,
    image_links,
    table_under,
    tables,
)

DOCS = Path(__file__).resolve().parent.parent / "docs"
MEMORY_HEADERS = {"weights": "weights", "gradients": "gradients", "master_weights": "fp32 master weights",
                  "optimizer_states": "optimizer states", "activations": "activations", "peak": "peak"}


def run(*args: str):
    return CliRunner().invoke(main, list(args))


def plan_json(model: str, *args: str) -> dict:
    result = run("--model", model, *args, "--format", "json")
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


DOCS_EXAMPLES = ("capacity.md", "capacity-24gb.md")


def _docs_command(markdown: Path) -> list[str]:
    """The command a committed example records under "made by", without the program name."""
    made_by = next(line for line in markdown.read_text().splitlines() if line.startswith("- made by: `"))
    words = shlex.split(made_by.removeprefix("- made by: `").removesuffix("`"))
    assert words[:3] == ["lora-plan", "report", "capacity"]
    return words[1:]


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory) -> dict[str, Path]:
    """Each committed example made again by its own command, run from a fresh folder as from the
    repository root. The default report is one of them, so the other tests read it too."""
    root = tmp_path_factory.mktemp("repo")
    runner = CliRunner()
    fresh = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        for name in DOCS_EXAMPLES:
            args = _docs_command(DOCS / name)
            assert args[args.index("--output") + 1] == f"docs/{name}"
            result = runner.invoke(main, args)
            assert result.exit_code == 0, result.output
            assert result.stderr == ""
            fresh[name] = root / "docs" / name
    return fresh


@pytest.fixture(scope="module")
def default_report(regenerated) -> Path:
    assert _docs_command(DOCS / "capacity.md") == ["report", "capacity", "--output", "docs/capacity.md"]
    return regenerated["capacity.md"]


def gpus_cell(cell: str) -> int | None:
    """A "GPUs needed" cell: a count, or "-" where no count fits."""
    return None if cell == "-" else int(cell)


def _label(entry: dict) -> str:
    return entry["method"] if entry["rank"] is None else f"{entry['method']} r={entry['rank']}"


def test_summary_equals_plan_json(default_report):
    """Default report (GPT-2 and Llama-3.1 8B/70B/405B, ranks 1, 8, 64, an 80 GB card) against
    `lora-plan --format json` with the same settings, cell by cell. Activations and the
    step-timeline peak are non-zero and read by key like every other term."""
    summary = table_under(default_report.read_text(), "Summary")
    models = ["gpt2", "llama-3.1-8b", "llama-3.1-70b", "llama-3.1-405b"]
    assert list(dict.fromkeys(summary.column("model"))) == models
    checked = 0
    for model in models:
        data = plan_json(model, "--rank", "1,8,64", "--tasks", "10", "--gpu", "H100-80GB")
        assert all(e["memory_bytes"]["activations"] > 0 for e in data["plans"])
        rows = [r for r in summary.rows if r["model"] == model]
        assert [r["method"] for r in rows] == [_label(e) for e in data["plans"]]
        for row, entry in zip(rows, data["plans"], strict=True):
            assert int(row["trainable params"].replace(",", "")) == entry["trainable_params"]
            printed = float(row["trainable %"].rstrip("%"))
            assert abs(printed - entry["trainable_percent"]) <= 5e-4 * entry["trainable_percent"]
            for key, header in MEMORY_HEADERS.items():
                assert_size_matches(row[header], entry["memory_bytes"][key])
            assert gpus_cell(row["GPUs needed"]) == entry["gpus_needed"]
            assert_size_matches(row["checkpoint"], entry["checkpoint_bytes"])
            assert row["peak phase"] == entry["peak_phase"]
            assert_size_matches(row["+ CUDA context/cache"], entry["device_overhead_bytes"])
            checked += 1
    assert checked == 4 * 7


def test_rank_table_and_reduction_factor(default_report):
    ranks = table_under(default_report.read_text(), "Trainable parameters versus rank")
    data = plan_json("llama-3.1-70b", "--rank", "1,8,64")
    full = data["plans"][0]["trainable_params"]
    rows = [r for r in ranks.rows if r["model"] == "llama-3.1-70b"]
    lora = [e for e in data["plans"] if e["method"] == "lora"]
    assert [int(r["rank"]) for r in rows] == [e["rank"] for e in lora] == [1, 8, 64]
    for row, entry in zip(rows, lora, strict=True):
        assert int(row["trainable params"].replace(",", "")) == entry["trainable_params"]
        factor = float(row["reduction vs full"].rstrip("x").replace(",", ""))
        assert abs(factor - full / entry["trainable_params"]) <= 0.05
        assert_size_matches(row["adapter checkpoint"], entry["checkpoint_bytes"])
    # Fewer trainable parameters at a lower rank: the reduction grows as the rank falls.
    factors = [float(r["reduction vs full"].rstrip("x").replace(",", "")) for r in rows]
    assert factors == sorted(factors, reverse=True)


def test_storage_for_n_fine_tunes(default_report):
    storage = table_under(default_report.read_text(), "Storage for 10 fine-tunes")
    data = plan_json("llama-3.1-8b", "--rank", "1,8,64", "--tasks", "10")
    rows = [r for r in storage.rows if r["model"] == "llama-3.1-8b"]
    for row, entry in zip(rows, data["plans"], strict=True):
        kept = entry["storage_bytes"]["full_copies" if entry["method"] == "full" else "base_plus_adapters"]
        assert_size_matches(row["10 fine-tunes"], kept)
        assert_size_matches(row["10 full copies"], entry["storage_bytes"]["full_copies"])
        assert_size_matches(row["one fine-tune"], entry["checkpoint_bytes"])


def test_settings_stated_once_at_the_top(default_report):
    text = default_report.read_text()
    settings = text.split("## Settings and conventions")[1].split("## Summary")[0]
    assert "`lora-plan report capacity --output " in settings
    assert "H100-80GB, 85,520,809,984 bytes (81,559 MiB)" in settings
    assert "precision: mixed" in settings and "optimizer: adamw" in settings
    assert "LoRA targets for llama-3.1-8b: q_proj, v_proj" in settings
    assert "decimal units (1 GB = 10^9 bytes)" in settings
    assert text.count("## Settings and conventions") == 1
    for note in plan_json("gpt2")["notes"]:
        assert f"note: {note}" in settings


def test_plots_linked_and_valid_png(default_report):
    images = assert_images_are_png(default_report)
    assert sorted(p.name for p in images) == ["capacity-gpus-per-model.png", "capacity-memory-breakdown.png",
                                              "capacity-memory-vs-rank.png"]
    assert all(not Path(link).is_absolute() for link in image_links(default_report.read_text()))


def test_options_change_the_plans(tmp_path):
    out = tmp_path / "sub" / "l4.md"
    result = run("report", "capacity", "--models", "gpt2", "--models", "1b", "--methods", "lora,qlora",
                 "--ranks", "4", "--gpu", "l4", "--precision", "bf16", "--units", "GiB", "--tasks", "3",
                 "--batch-size", "4", "--seq-len", "512", "--grad-checkpointing", "--attention", "eager",
                 "-o", str(out))
    assert result.exit_code == 0, result.output
    text = out.read_text()
    summary = table_under(text, "Summary")
    data = plan_json("llama-3.2-1b", "--method", "lora,qlora", "--rank", "4", "--gpu", "l4",
                     "--precision", "bf16", "--batch-size", "4", "--seq-len", "512", "--grad-checkpointing",
                     "--attention", "eager")
    rows = [r for r in summary.rows if r["model"] == "llama-3.2-1b"]
    assert [r["method"] for r in rows] == ["lora r=4", "qlora r=4"]
    for row, entry in zip(rows, data["plans"], strict=True):
        assert row["peak"].endswith("GiB") or row["peak"].endswith("MiB")
        assert_size_matches(row["peak"], entry["memory_bytes"]["peak"])
        assert_size_matches(row["activations"], entry["memory_bytes"]["activations"])
        assert gpus_cell(row["GPUs needed"]) == entry["gpus_needed"]
    assert "## Storage for 3 fine-tunes" in text
    assert "binary units (1 GiB = 2^30 bytes)" in text
    assert "--methods lora,qlora" in text and "--models gpt2 --models 1b" in text
    assert "batch_size=4, seq_len=512, attention=eager, grad_checkpointing=True" in text
    assert "--grad-checkpointing" in text


def test_summary_columns_are_data():
    """A plan key that appears later becomes a column by adding a `Column`; a column no plan has a
    value for is left out rather than printed empty."""
    plans = [{"model": {"name": "m"}, "plans": [
        {"method": "full", "rank": None, "trainable_params": 10, "extra_count": 1234},
        {"method": "lora", "rank": 8, "trainable_params": 2},
    ]}]
    columns = (Column("trainable params", ("trainable_params",), "count"),
               Column("extra", ("extra_count",), "count"),
               Column("absent", ("nothing", "here"), "bytes"))
    frame = summary_frame(plans, "GB", columns)
    assert list(frame.columns) == ["model", "method", "trainable params", "extra"]
    assert list(frame["extra"]) == ["1,234", "-"]
    assert {c.header for c in SUMMARY_COLUMNS} >= set(MEMORY_HEADERS.values())


def test_without_matplotlib_the_report_says_so(tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib...` fail
    out = tmp_path / "capacity.md"
    result = run("report", "capacity", "--models", "gpt2", "--ranks", "8", "-o", str(out))
    assert result.exit_code == 0, result.output
    assert "matplotlib is not installed" in result.stderr
    text = out.read_text()
    assert image_links(text) == []
    assert "No plots: matplotlib is not installed" in text
    assert list(tmp_path.glob("*.png")) == []
    tables(text)  # still well formed


@pytest.mark.parametrize("args,fragment", [
    (("--models", "lama-3.1-8b"), "unknown model"),
    (("--methods", "prefix"), "unknown method 'prefix'"),
    (("--ranks", "0"), "rank must be a positive"),
    (("--gpu", "h1000"), "unknown GPU"),
    (("--gpu-mem", "80 bananas"), "cannot read size"),
])
def test_bad_input_is_one_line(tmp_path, args, fragment):
    out = tmp_path / "capacity.md"
    result = run("report", "capacity", *args, "-o", str(out))
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:") and fragment in lines[0], result.output
    assert not out.exists()


@pytest.mark.parametrize("name", DOCS_EXAMPLES)
def test_docs_example_is_fresh(name, regenerated):
    """The committed example equals what its own recorded command writes now; when the planner
    changes, run that command again from the repository root."""
    committed = DOCS / name
    assert regenerated[name].read_text() == committed.read_text(), (
        f"docs/{name} is stale: run `{shlex.join(['lora-plan', *_docs_command(committed)])}` "
        "from the repository root")
    assert_images_are_png(committed)
    assert sorted(image_links(committed.read_text())) == sorted(image_links(regenerated[name].read_text()))

LIGHT_PROBE = """
import sys
from lora_planner.cli import main
for args in (["--model", "70b", "--rank", "8"], ["report", "--help"], ["report", "capacity", "--help"]):
    try:
        main(args)
    except SystemExit as exc:
        assert exc.code in (0, None), (args, exc.code)
heavy = sorted(m for m in ("pandas", "matplotlib", "numpy", "torch") if m in sys.modules)
print("HEAVY", heavy)
"""


def test_report_commands_keep_the_plan_path_light():
    """Registering `report` on the main command loads neither pandas nor matplotlib until a report
    is written."""
    import subprocess

    out = subprocess.run([sys.executable, "-c", LIGHT_PROBE], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "HEAVY []"


def test_local_config_and_repeated_names(tmp_path):
    from lora_planner.catalog import get_model
    from lora_planner.spec import to_hf_config

    folder = tmp_path / "my-model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(to_hf_config(get_model("gpt2"))))
    out = tmp_path / "c.md"
    result = run("report", "capacity", "--models", f"{folder},8b,llama-3.1-8b", "--methods", "full",
                 "-o", str(out))
    assert result.exit_code == 0, result.output
    summary = table_under(out.read_text(), "Summary")
    assert summary.column("model") == ["my-model", "llama-3.1-8b"]  # the alias plans its model once
    # Full fine-tuning alone has no ranks: no rank table, no rank chart.
    assert "## Trainable parameters versus rank" not in out.read_text()
    images = sorted(p.name for p in assert_images_are_png(out))
    assert images == ["c-gpus-per-model.png", "c-memory-breakdown.png"]
    assert int(summary.rows[0]["trainable params"].replace(",", "")) == plan_json(
        str(folder), "--method", "full")["plans"][0]["trainable_params"]


def test_output_that_cannot_be_written(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = run("report", "capacity", "--models", "gpt2", "-o", str(blocker / "capacity.md"))
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: cannot write {blocker / 'capacity.md'}")


def test_help_teaches():
    out = run("report", "capacity", "--help").output
    assert "lora-plan report capacity -o capacity.md" in out
    for option in ("--models", "--ranks", "--methods", "--gpu", "--tasks", "--grad-checkpointing", "--units"):
        assert option in out
    assert "capacity" in run("report", "--help").output and "report" in run("--help").output


def test_the_plans_singular_spelling_is_read_too(tmp_path):
    """`plan` says --model/--method/--rank; `report capacity` takes those spellings as well as its
    plurals, and writes the same report (its command line in the plural)."""
    common = ("--gpu", "l4", "--seq-len", "256")
    plural, singular = tmp_path / "xplr.md", tmp_path / "xsgl.md"
    assert run("report", "capacity", "--models", "gpt2", "--methods", "lora", "--ranks", "4", *common,
               "-o", str(plural)).exit_code == 0
    result = run("report", "capacity", "--model", "gpt2", "--method", "lora", "--rank", "4", *common,
                 "-o", str(singular))
    assert result.exit_code == 0, result.output
    assert singular.read_text().replace("xsgl", "xplr") == plural.read_text()
