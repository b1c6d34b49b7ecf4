"""Atomic writes: a failure mid-write leaves the previous file (or adapter folder) and no litter."""

from __future__ import annotations

import json
import os

import pytest

from lora_planner import files
from lora_planner.errors import PlanError


def listing(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "report.md"
    target.write_text("old\n")
    target.chmod(0o640)
    with pytest.raises(RuntimeError), files.replacing(target) as temporary:
        temporary.write_text("half a rep")
        raise RuntimeError("disk full")
    assert target.read_text() == "old\n" and listing(tmp_path) == ["report.md"]
    files.write_text(target, "new\n")
    assert target.read_text() == "new\n" and listing(tmp_path) == ["report.md"]
    assert target.stat().st_mode & 0o777 == 0o640  # a replaced file keeps its mode


def test_a_new_file_gets_the_umask_mode_not_mkstemps_private_one(tmp_path):
    previous = os.umask(0o022)
    try:
        files.write_bytes(tmp_path / "a" / "b.png", b"\x89PNG")
    finally:
        os.umask(previous)
    assert (tmp_path / "a" / "b.png").stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "move-aside"])
def test_a_folder_is_replaced_as_a_pair_or_not_at_all(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(files, "_exchange", lambda first, second: False)
    target = tmp_path / "adapter"
    own = ("weights", "config.json")
    with files.replacing_folder(target, own) as folder:
        (folder / "weights").write_bytes(b"old weights")
        (folder / "config.json").write_text("old config")
    with pytest.raises(OSError), files.replacing_folder(target, own) as folder:
        (folder / "weights").write_bytes(b"new weights")
        raise OSError(28, "No space left on device")  # before the config is written
    assert (target / "weights").read_bytes() == b"old weights"
    assert (target / "config.json").read_text() == "old config"
    assert listing(tmp_path) == ["adapter"]
    with files.replacing_folder(target, own) as folder:
        (folder / "weights").write_bytes(b"new weights")
        (folder / "config.json").write_text("new config")
    assert listing(target) == ["config.json", "weights"]
    assert (target / "weights").read_bytes() == b"new weights"
    assert listing(tmp_path) == ["adapter"]


def test_a_folder_holding_other_files_is_not_replaced(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(PlanError, match=r"already holds other files \(notes.txt\)"):
        with files.replacing_folder(tmp_path / "out", ("weights",)):
            pass
    (tmp_path / "file").write_text("x")
    with pytest.raises(PlanError, match="is a file, not a folder"):
        files.check_folder_target(tmp_path / "file", ())
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("name, message", [
    (".", "is a folder"),
    ("/dev/full", "is not a regular file"),
    ("file/records.jsonl", "is not a folder"),
])
def test_an_output_that_cannot_take_a_record_is_refused(tmp_path, name, message):
    (tmp_path / "file").write_text("")
    if name.startswith("/") and not os.path.exists(name):
        pytest.skip(f"no {name} here")
    path = name if name.startswith("/") else tmp_path / name
    with pytest.raises(PlanError, match=message):
        files.check_output_file(path)
    files.check_output_file(tmp_path / "new" / "deeper" / "records.jsonl")  # made when written
    assert not (tmp_path / "new").exists()


# --- the writers that use them -------------------------------------------------------------


def test_a_save_that_fails_after_the_weights_keeps_the_previous_adapter(tmp_path, monkeypatch):
    """The config is written after the weights: failing there must not leave new weights beside
    the old config."""
    lora = pytest.importorskip("lora_planner.measure.lora")
    from tests.measure_models import tiny_model

    first = tiny_model()
    lora.inject(first, ("c_attn",), rank=2)
    target = lora.save_adapter(first, tmp_path / "ad")
    before = {name: (target / name).read_bytes() for name in listing(target)}
    second = tiny_model()
    lora.inject(second, ("all-linear",), rank=4)

    def fail(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(type(target), "write_text", fail)
    with pytest.raises(OSError):
        lora.save_adapter(second, target)
    monkeypatch.undo()
    assert {name: (target / name).read_bytes() for name in listing(target)} == before
    assert json.loads(before[lora.ADAPTER_CONFIG])["r"] == 2
    assert listing(tmp_path) == ["ad"]
    lora.save_adapter(second, target)
    assert json.loads((target / lora.ADAPTER_CONFIG).read_text())["r"] == 4


def test_a_resize_that_fails_mid_write_keeps_the_previous_output(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    safetensors_torch = pytest.importorskip("safetensors.torch")
    from lora_planner import adapter_rank, spectrum

    g = torch.Generator().manual_seed(0)
    source = tmp_path / "ad"
    source.mkdir()
    safetensors_torch.save_file({"base_model.model.l.lora_B.weight": torch.randn(8, 4, generator=g),
                                 "base_model.model.l.lora_A.weight": torch.randn(4, 8, generator=g)},
                                str(source / adapter_rank.ADAPTER_WEIGHTS))
    (source / adapter_rank.ADAPTER_CONFIG).write_text(json.dumps({"r": 4, "lora_alpha": 8}))
    out = tmp_path / "small"
    adapter_rank.resize_adapter(source, spectrum.Criterion("rank", 2), out)
    before = {name: (out / name).read_bytes() for name in listing(out)}

    def fail(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(type(out), "write_text", fail)
    with pytest.raises(OSError):
        adapter_rank.resize_adapter(source, spectrum.Criterion("rank", 1), out)
    monkeypatch.undo()
    assert {name: (out / name).read_bytes() for name in listing(out)} == before
    assert listing(tmp_path) == ["ad", "small"]
    with pytest.raises(PlanError, match="already holds other files"):
        adapter_rank.resize_adapter(source, spectrum.Criterion("rank", 1), tmp_path)


def test_a_report_cut_short_mid_write_keeps_the_previous_report(tmp_path, monkeypatch):
    pytest.importorskip("pandas")
    from lora_planner.reports import validation
    from tests.test_measure_records import record as make

    out = tmp_path / "validation.md"
    out.write_text("the previous report\n")
    records = tmp_path / "r.jsonl"
    records.write_text(json.dumps(make(peak_allocated=500)) + "\n")
    real_write_bytes = type(out).write_bytes

    def half_then_fail(self, data):
        real_write_bytes(self, data[: len(data) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(type(out), "write_bytes", half_then_fail)
    monkeypatch.setattr(validation, "_scatter", lambda *args: None)  # the markdown is the point here
    with pytest.raises(OSError):
        validation.write_validation_report([records], out, "lora-plan report validation")
    assert out.read_text() == "the previous report\n" and listing(tmp_path) == ["r.jsonl", "validation.md"]


def test_a_target_that_is_not_a_regular_file_is_written_in_place_not_replaced(tmp_path):
    """Renaming onto /dev/full (or a pipe) would swap the device node for a plain file: a report
    sent there is written through it, and the node stays what it was."""
    import stat
    import threading

    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    received = []
    reader = threading.Thread(target=lambda: received.append(pipe.read_bytes()))
    reader.start()
    files.write_text(pipe, "report\n")
    reader.join(timeout=10)
    assert received == [b"report\n"]
    assert stat.S_ISFIFO(os.lstat(pipe).st_mode)
    assert listing(tmp_path) == ["pipe"]


def test_a_symbolic_link_is_followed_and_kept(tmp_path):
    (tmp_path / "real.md").write_text("old")
    (tmp_path / "link.md").symlink_to("real.md")
    files.write_text(tmp_path / "link.md", "new")
    assert (tmp_path / "link.md").is_symlink()
    assert (tmp_path / "real.md").read_text() == "new"
