"""Adapter spectra, resizing and full-update diffs, against dense SVDs, PEFT and real files."""

from __future__ import annotations

import copy
import json
import math
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_planner import adapter_rank, spectrum
from lora_planner.errors import PlanError
from tests.measure_models import tiny_model, tokens, torch

safetensors_torch = pytest.importorskip("safetensors.torch")
lora = pytest.importorskip("lora_planner.measure.lora")


def orthonormal(rows: int, cols: int, generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(rows, cols, generator=generator, dtype=torch.float64))
    return q  # (rows, cols), orthonormal columns


def factors_with_spectrum(sigma, d: int, k: int, scaling: float, seed: int = 0):
    """B (d, r), A (r, k) with scaling·B·A = U diag(sigma) Vᵀ, mixed by a random invertible r x r
    matrix so that neither factor is orthogonal."""
    g = torch.Generator().manual_seed(seed)
    r = len(sigma)
    u, v = orthonormal(d, r, g), orthonormal(k, r, g)
    mix = torch.randn(r, r, generator=g, dtype=torch.float64) + 3 * torch.eye(r, dtype=torch.float64)
    b = u @ torch.diag(torch.tensor(sigma, dtype=torch.float64)) @ mix  # (d, r)
    a = torch.linalg.solve(mix, v.T) / scaling  # (r, k)
    return b, a


def write_adapter(folder, layers: dict[str, tuple], config: dict):
    """An adapter folder in PEFT's layout from {module: (B, A)} and a config."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, (b, a) in layers.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = a.float().contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = b.float().contiguous()
    safetensors_torch.save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", **config}))
    return folder


# ---------------------------------------------------------------------------------------------
# The spectrum


def test_constructed_spectrum_gives_exact_singular_values_and_energy_ranks(tmp_path):
    # Energy shares 0.5, 0.3, 0.15, 0.05: 90% and 95% need 3 directions, 99% needs 4.
    sigma = [math.sqrt(e) for e in (0.5, 0.3, 0.15, 0.05)]
    b, a = factors_with_spectrum(sigma, d=48, k=40, scaling=16 / 4)
    write_adapter(tmp_path / "ad", {"model.layers.0.q_proj": (b, a)}, {"r": 4, "lora_alpha": 16})
    result = adapter_rank.analyze_adapter(tmp_path / "ad").to_dict()
    (layer,) = result["layers"]
    assert layer["shape"] == [48, 40] and layer["rank"] == 4
    assert layer["singular_values"] == pytest.approx(sigma, rel=1e-5)
    assert layer["energy_rank"] == {"0.9": 3, "0.95": 3, "0.99": 4}
    assert result["summary"]["recommended_rank"] == 3


@settings(max_examples=40, deadline=None)
@given(d=st.integers(1, 40), k=st.integers(1, 40), r=st.integers(1, 12), seed=st.integers(0, 10**6),
       scaling=st.floats(0.01, 100), rank_deficient=st.booleans())
def test_factored_svd_matches_a_dense_svd(d, k, r, seed, scaling, rank_deficient):
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(d, r, generator=g)
    a = torch.randn(r, k, generator=g)
    if rank_deficient and r > 1:
        b[:, -1] = b[:, 0]  # two equal columns: rank r - 1 at most
    dense = torch.linalg.svdvals(scaling * b.double() @ a.double())  # (min(d, k),)
    ours = spectrum.factored_singular_values(b, a, scaling)
    assert len(ours) == min(d, k, r)
    assert ours == pytest.approx(dense[: len(ours)].tolist(), rel=1e-9, abs=1e-9 * float(dense[0]))
    assert all(x <= 1e-9 * float(dense[0]) for x in dense[len(ours):].tolist())
    u, s, vh = spectrum.factored_svd(b, a, scaling)
    assert torch.allclose(u @ torch.diag(s) @ vh, scaling * b.double() @ a.double(),
                          atol=1e-9 * float(dense[0]))


@settings(max_examples=60, deadline=None)
@given(values=st.lists(st.floats(0, 1e3), min_size=1, max_size=30), level=st.floats(0.01, 1.0))
def test_energy_rank_is_the_fewest_directions_reaching_the_share(values, level):
    values = sorted(values, reverse=True)
    k = spectrum.energy_rank(values, level)
    total = sum(v * v for v in values)
    if total == 0:
        assert k == 0
        return
    assert sum(v * v for v in values[:k]) >= level * total * (1 - 1e-9)
    assert sum(v * v for v in values[: k - 1]) < level * total * (1 + 1e-9) or k == 1


def test_criteria_follow_kohya_definitions():
    values = [8.0, 4.0, 2.0, 1.0]  # energies 64, 16, 4, 1 of 85
    assert spectrum.Criterion("rank", 2).keep(values) == 2
    assert spectrum.Criterion("rank", 9).keep(values) == 4
    assert spectrum.Criterion("energy", 80 / 85).keep(values) == 2
    assert spectrum.Criterion("fro", math.sqrt(80 / 85)).keep(values) == 2
    assert spectrum.Criterion("sv_ratio", 4).keep(values) == 3  # 8/4 = 2: keeps 8, 4, 2
    assert spectrum.Criterion("energy", 0.01).keep([0.0, 0.0]) == 1  # at least one direction
    for kind, value in (("rank", 0), ("energy", 1.5), ("fro", 0), ("sv_ratio", 0.5), ("spectral", 1)):
        with pytest.raises(PlanError):
            spectrum.Criterion(kind, value)


# ---------------------------------------------------------------------------------------------
# Resizing


def dense_delta(folder, name: str) -> torch.Tensor:
    """ΔW of one module read back from a folder: scaling from its config, computed densely."""
    source = adapter_rank.open_adapter(folder)
    for m, b, a in adapter_rank.iter_factors(source):
        if m.name == name:
            return m.scaling * b.double() @ a.double()
    raise KeyError(name)


def test_resize_to_full_rank_changes_nothing_and_to_rank_one_keeps_the_top_direction(tmp_path):
    g = torch.Generator().manual_seed(5)
    layers = {f"model.layers.{i}.v_proj": (torch.randn(24, 6, generator=g), torch.randn(6, 32, generator=g))
              for i in range(3)}
    source = write_adapter(tmp_path / "ad", layers, {"r": 6, "lora_alpha": 12})
    full = adapter_rank.resize_adapter(source, spectrum.Criterion("rank", 6), tmp_path / "full")
    one = adapter_rank.resize_adapter(source, spectrum.Criterion("rank", 1), tmp_path / "one")
    assert json.loads((tmp_path / "one" / "adapter_config.json").read_text())["r"] == 1
    for name in layers:
        before = dense_delta(source, name)
        assert torch.allclose(dense_delta(tmp_path / "full", name), before, atol=1e-5)
        u, s, vh = torch.linalg.svd(before)
        top = s[0] * torch.outer(u[:, 0], vh[0])
        after = dense_delta(tmp_path / "one", name)
        assert torch.allclose(after, top, atol=1e-5 * float(s[0]))
        error = next(x.frobenius_error for x in one.layers if x.name == name)
        assert error == pytest.approx(float(torch.linalg.norm(before - after) / torch.linalg.norm(before)),
                                      rel=1e-5)
    assert all(x.frobenius_error < 1e-6 for x in full.layers)


@pytest.mark.parametrize("config", [
    {"use_rslora": False, "alpha_pattern": {}},
    {"use_rslora": True, "alpha_pattern": {}},
    {"use_rslora": False, "alpha_pattern": {"c_proj": 3.0}},
])
def test_peft_loads_a_dynamically_resized_adapter_with_the_truncated_logits(tmp_path, config):
    peft = pytest.importorskip("peft")
    base = tiny_model()
    model = copy.deepcopy(base)
    lora.inject(model, ("all-linear",), rank=6, alpha=12)
    lora.save_adapter(model, tmp_path / "ad")
    g = torch.Generator().manual_seed(11)
    written = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    written |= config
    (tmp_path / "ad" / "adapter_config.json").write_text(json.dumps(written))
    # Factors with decaying spectra, so an energy criterion gives different ranks per layer.
    tensors = {}
    for name, layer in lora.lora_layers(model).items():
        d, k = layer.lora_B.weight.shape[0], layer.lora_A.weight.shape[1]
        decay = torch.rand(6, generator=g) ** 4
        tensors[f"base_model.model.{name}.lora_B.weight"] = (torch.randn(d, 6, generator=g) * decay).float()
        tensors[f"base_model.model.{name}.lora_A.weight"] = torch.randn(6, k, generator=g).float()
    safetensors_torch.save_file(tensors, str(tmp_path / "ad" / "adapter_model.safetensors"),
                                metadata={"format": "pt"})
    resized = adapter_rank.resize_adapter(tmp_path / "ad", spectrum.Criterion("energy", 0.8),
                                          tmp_path / "small")
    assert len({x.new_rank for x in resized.layers}) > 1  # ranks differ: rank_pattern is used

    # The oracle: the base model with each weight plus the dense truncation of ΔW as PEFT computes it
    # from the original adapter (`get_delta_weight`, in the weight's own (in, out) layout).
    original = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ad")
    expected_model = copy.deepcopy(base)
    new_rank = {x.name: x.new_rank for x in resized.layers}
    with torch.no_grad():
        for name, k in new_rank.items():
            delta = original.base_model.model.get_submodule(name).get_delta_weight("default").double()
            u, s, vh = torch.linalg.svd(delta)
            expected_model.get_submodule(name).weight += ((u[:, :k] * s[:k]) @ vh[:k]).float()
    x = tokens()
    expected = expected_model(input_ids=x).logits
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "small").eval()
    for name, module in loaded.named_modules():
        if name.removeprefix("base_model.model.") in new_rank:
            assert module.r["default"] == new_rank[name.removeprefix("base_model.model.")]
    assert (loaded(input_ids=x).logits - expected).abs().max().item() < 1e-4
    assert (base(input_ids=x).logits - expected).abs().max().item() > 1e-2  # the adapter matters
    ours = copy.deepcopy(base)
    lora.load_adapter(ours, tmp_path / "small")
    assert (ours.eval()(input_ids=x).logits - expected).abs().max().item() < 1e-4


def test_summary_sizes_match_the_files_resize_writes(tmp_path):
    g = torch.Generator().manual_seed(2)
    sigma = [4.0, 2.0, 0.05, 0.01]
    layers = {f"model.layers.{i}.q_proj": factors_with_spectrum(sigma, 64, 64, 2.0, seed=i) for i in range(4)}
    source = write_adapter(tmp_path / "ad", layers, {"r": 4, "lora_alpha": 8})
    del g
    analysis = adapter_rank.analyze_adapter(source, keep=0.99)
    s = analysis.summary
    assert s["now"]["bytes"] == (source / "adapter_model.safetensors").stat().st_size
    assert s["recommended_rank"] == 2
    resized = adapter_rank.resize_adapter(source, spectrum.Criterion("rank", 2), tmp_path / "r2")
    assert s["at_recommended_rank"]["bytes"] == (tmp_path / "r2" / "adapter_model.safetensors").stat().st_size
    assert s["at_recommended_rank"]["params"] == resized.params[1] == 4 * 2 * (64 + 64)


def test_llama_8b_shaped_adapter_is_analysed_in_seconds_without_a_dense_matrix(tmp_path):
    """64 modules (q_proj and v_proj of 32 layers), r=16, shapes from the planner's layout of
    Llama-3.1-8B: no tensor of the analysis may come near d x k entries."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from lora_planner.catalog import get_model
    from lora_planner.counts import lora_trainable
    from lora_planner.spec import TrainSetup

    trainable = lora_trainable(get_model("llama-3.1-8b"), TrainSetup(rank=16))
    params = trainable.file_params
    assert len(trainable.adapters) == 64
    g = torch.Generator().manual_seed(0)
    tensors = {p.name: torch.randn(p.shape, generator=g).to(torch.bfloat16) for p in params}
    folder = tmp_path / "llama"
    folder.mkdir()
    safetensors_torch.save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 16, "lora_alpha": 32}))
    del tensors

    class LargestTensor(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    LargestTensor.largest = max(LargestTensor.largest, t.numel())
            return out

    start = time.perf_counter()
    with LargestTensor():
        analysis = adapter_rank.analyze_adapter(folder)
    seconds = time.perf_counter() - start
    smallest_dense = min(layer.shape[0] * layer.shape[1] for layer in analysis.layers)  # 1024 x 4096
    largest_factor = max(p.numel for p in params)  # 4096 x 16
    assert len(analysis.layers) == 64 and all(len(x.singular_values) == 16 for x in analysis.layers)
    # QR works on a copy of a factor and its workspace: a few factors' worth, 1/30 of a d x k matrix.
    assert LargestTensor.largest <= 2 * largest_factor < smallest_dense / 30
    assert seconds < 20, seconds  # about a second on two shared cores


# ---------------------------------------------------------------------------------------------
# Full fine-tuning: the difference of two checkpoints


def test_diff_recovers_a_planted_low_rank_update(tmp_path):
    g = torch.Generator().manual_seed(4)
    base = {"layers.0.mlp.weight": torch.randn(30, 20, generator=g),
            "layers.0.attn.weight": torch.randn(20, 20, generator=g),
            "layers.0.norm.weight": torch.ones(20), "layers.1.attn.weight": torch.randn(20, 20, generator=g)}
    sigma = [3.0, 0.5]
    b, a = factors_with_spectrum(sigma, 30, 20, 1.0, seed=9)
    tuned = dict(base)
    tuned["layers.0.mlp.weight"] = base["layers.0.mlp.weight"] + (b @ a).float()
    tuned["layers.0.norm.weight"] = base["layers.0.norm.weight"] * 2  # 1-D: not analysed
    safetensors_torch.save_file(base, str(tmp_path / "base.safetensors"))
    # The fine-tuned one sharded in two files with an index, as save_pretrained writes large models.
    shards = tmp_path / "tuned"
    shards.mkdir()
    keys = sorted(tuned)
    first, second = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
    safetensors_torch.save_file({k: tuned[k] for k in keys[:2]}, str(shards / first))
    safetensors_torch.save_file({k: tuned[k] for k in keys[2:]}, str(shards / second))
    index = {k: (first if k in keys[:2] else second) for k in keys}
    (shards / "model.safetensors.index.json").write_text(json.dumps({"weight_map": index}))

    analysis = adapter_rank.diff_checkpoints(tmp_path / "base.safetensors", shards)
    layers = {x.name: x for x in analysis.layers}
    assert set(layers) == {"layers.0.mlp", "layers.0.attn", "layers.1.attn"}
    mlp = layers["layers.0.mlp"]
    assert mlp.shape == (30, 20) and mlp.rank == 20
    assert mlp.singular_values[:2] == pytest.approx(sigma, rel=1e-5)
    assert max(mlp.singular_values[2:]) < 1e-5
    assert mlp.energy_rank(0.99) == 2 and layers["layers.0.attn"].energy_rank(0.9) == 0
    only = adapter_rank.diff_checkpoints(tmp_path / "base.safetensors", shards, include=r"mlp")
    assert [x.name for x in only.layers] == ["layers.0.mlp"]
    assert only.summary["recommended_rank"] == 1  # 9 / 9.25 of the energy in the top direction


# ---------------------------------------------------------------------------------------------
# The command line


def run(*args: str):
    from click.testing import CliRunner

    from lora_planner.cli import main

    return CliRunner().invoke(main, list(args))


def one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:"), result.output
    for fragment in fragments:
        assert fragment in lines[0]


def gpt2_adapter(tmp_path, rank: int = 8):
    """A real GPT-2-shaped adapter file from our harness (tiny width), with trained-looking B."""
    model = tiny_model()
    lora.inject(model, ("default",), rank=rank, alpha=2 * rank)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in lora.lora_layers(model).values():
            decay = torch.tensor([0.5**i for i in range(rank)])
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * decay)
    return lora.save_adapter(model, tmp_path / f"r{rank}")


def test_analyze_json_contract_and_planner_savings(tmp_path):
    folder = gpt2_adapter(tmp_path)
    result = run("adapter", "analyze", str(folder), "--format", "json", "--model", "gpt2", "--seq-len", "128")
    assert result.exit_code == 0, result.output
    values = json.loads(result.output)
    assert set(values) >= {"adapter", "layers", "summary"}
    assert values["adapter"]["r"] == 8 and values["adapter"]["modules"] == 2
    for layer in values["layers"]:
        assert set(layer) >= {"name", "shape", "rank", "singular_values", "energy_rank"}
        assert layer["singular_values"] == sorted(layer["singular_values"], reverse=True)
        assert set(layer["energy_rank"]) == {"0.9", "0.95", "0.99"}
    summary = values["summary"]
    planner = summary["planner"]
    assert planner["targets"] == ["c_attn"] and planner["model"] == "gpt2"
    assert summary["recommended_rank"] < 8
    assert planner["at_recommended_rank"]["rank"] == summary["recommended_rank"]
    assert planner["saved_peak_bytes"] > 0
    table = run("adapter", "analyze", str(folder), "--model", "gpt2", "--explain")
    assert table.exit_code == 0, table.output
    assert "recommended rank" in table.output and "through the planner" in table.output
    assert f"= {summary['recommended_rank']}" in table.output and "r·(d + k)" in table.output


def test_resize_command_and_its_errors(tmp_path):
    folder = gpt2_adapter(tmp_path)
    result = run("adapter", "resize", str(folder), "--energy", "0.9", "-o", str(tmp_path / "small"),
                 "--format", "json")
    assert result.exit_code == 0, result.output
    values = json.loads(result.output)
    assert all(x["new_rank"] <= 8 and 0 <= x["frobenius_error"] < 0.33 for x in values["layers"])
    assert "lora_alpha" in values["alpha_rule"]
    text = run("adapter", "resize", str(folder), "--rank", "2", "-o", str(tmp_path / "r2"))
    assert text.exit_code == 0 and "rel. Frobenius error" in text.output
    one_line_error(run("adapter", "resize", str(folder), "-o", str(tmp_path / "x")), "exactly one")
    one_line_error(run("adapter", "resize", str(folder), "--rank", "2", "--energy", "0.5", "-o",
                       str(tmp_path / "x")), "exactly one")
    one_line_error(run("adapter", "resize", str(folder), "--rank", "2", "-o", str(folder)), "own folder")
    one_line_error(run("adapter", "analyze", str(tmp_path / "nothing")), "no such file")
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    one_line_error(run("adapter", "analyze", str(tmp_path / "bad.safetensors")), "cannot read")
    one_line_error(run("adapter", "diff", str(folder), str(folder), "--include", "("), "regex")


def test_resize_into_a_folder_that_is_not_an_adapter_or_cannot_be_written_is_one_line(tmp_path, monkeypatch):
    folder = gpt2_adapter(tmp_path)
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "train.log").write_text("mine")
    one_line_error(run("adapter", "resize", str(folder), "--rank", "2", "-o", str(tmp_path / "work")),
                   "already holds other files (train.log)")
    assert (tmp_path / "work" / "train.log").read_text() == "mine"
    (tmp_path / "file").write_text("")
    one_line_error(run("adapter", "resize", str(folder), "--rank", "2", "-o", str(tmp_path / "file")),
                   "is a file")
    # a resize over an earlier one replaces it whole; one whose write fails leaves it as it was
    assert run("adapter", "resize", str(folder), "--rank", "4", "-o", str(tmp_path / "r")).exit_code == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "r").iterdir()}
    monkeypatch.setattr(type(tmp_path), "write_text", lambda *a, **k: (_ for _ in ()).throw(
        OSError(28, "No space left on device")))
    one_line_error(run("adapter", "resize", str(folder), "--rank", "2", "-o", str(tmp_path / "r")),
                   "No space left on device")
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in (tmp_path / "r").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_diff_command(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = {"h.0.w": torch.randn(8, 6, generator=g)}
    safetensors_torch.save_file(base, str(tmp_path / "a.safetensors"))
    safetensors_torch.save_file({"h.0.w": base["h.0.w"] + torch.outer(torch.ones(8), torch.ones(6))},
                                str(tmp_path / "b.safetensors"))
    result = run("adapter", "diff", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"),
                 "--format", "json")
    assert result.exit_code == 0, result.output
    (layer,) = json.loads(result.output)["layers"]
    assert layer["singular_values"][0] == pytest.approx(math.sqrt(48), rel=1e-6)
    assert layer["energy_rank"]["0.99"] == 1


def test_report_adapter_writes_sections_and_a_plot(tmp_path):
    r8, r2 = gpt2_adapter(tmp_path, 8), gpt2_adapter(tmp_path, 2)
    g = torch.Generator().manual_seed(0)
    base = {"h.0.w": torch.randn(8, 6, generator=g)}
    safetensors_torch.save_file(base, str(tmp_path / "a.safetensors"))
    safetensors_torch.save_file({"h.0.w": base["h.0.w"] * 1.5}, str(tmp_path / "b.safetensors"))
    output = tmp_path / "report" / "adapters.md"
    result = run("report", "adapter", str(r8), str(r2), "--diff", str(tmp_path / "a.safetensors"),
                 str(tmp_path / "b.safetensors"), "-o", str(output))
    assert result.exit_code == 0, result.output
    text = output.read_text()
    assert text.count("\n## ") == 3 and "recommended rank **" in text
    assert f"--diff {tmp_path / 'a.safetensors'} {tmp_path / 'b.safetensors'}" in text
    assert (tmp_path / "report" / "adapters-cumulative-energy.png").stat().st_size > 1000
    one_line_error(run("report", "adapter", "-o", str(output)), "at least one")


@pytest.mark.slow
def test_worked_example_script_runs_on_a_tiny_config(tmp_path):
    """benchmarks/adapter_example.py end to end on a tiny GPT-2 config (a minute on two cores)."""
    import subprocess
    import sys
    from pathlib import Path

    from tests.measure_models import tiny_config_file

    root = Path(__file__).resolve().parent.parent
    subprocess.run([sys.executable, str(root / "benchmarks" / "adapter_example.py"), "--model",
                    tiny_config_file(tmp_path), "--steps", "10", "--out", str(tmp_path / "out"), "--work",
                    str(tmp_path / "work")], check=True, cwd=root, capture_output=True,
                   env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"})
    results = json.loads((tmp_path / "out" / "adapter-rank.json").read_text())
    assert set(results["runs"]) == {"full", "lora r=8", "lora r=1"}
    assert all(x["peft_max_logit_difference"] < 1e-4 for x in results["resizes"])
    assert (tmp_path / "out" / "adapter-rank-cumulative-energy.png").is_file()


DIFF_MEMORY_PROBE = """
import resource, sys, torch
from lora_planner import adapter_rank
# Imports, LAPACK and the headers are loaded before the baseline: what grows after is the streaming.
torch.linalg.svdvals(torch.randn(4096, 256, dtype=torch.float64))
adapter_rank.checkpoint_files(sys.argv[1]), adapter_rank.checkpoint_files(sys.argv[2])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
analysis = adapter_rank.diff_checkpoints(sys.argv[1], sys.argv[2])
print(len(analysis.layers), (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""


def test_diff_streams_one_tensor_pair_at_a_time(tmp_path):
    """Two 64 MiB checkpoints (32 tensors of 2 MiB each): the diff's peak memory grows by a few
    tensors' worth, far below one checkpoint."""
    import subprocess
    import sys
    from pathlib import Path

    g = torch.Generator().manual_seed(0)
    for name, scale in (("a", 0.0), ("b", 1.0)):
        tensors = {f"layers.{i}.weight": torch.randn(4096, 128, generator=g) * scale for i in range(32)}
        safetensors_torch.save_file(tensors, str(tmp_path / f"{name}.safetensors"))
        del tensors
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", DIFF_MEMORY_PROBE, str(tmp_path / "a.safetensors"),
                          str(tmp_path / "b.safetensors")], capture_output=True, text=True, check=True,
                         cwd=root, env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"}).stdout
    layers, grown = map(int, out.split())
    checkpoint = 32 * 4096 * 128 * 4
    assert layers == 32
    assert grown < checkpoint / 4, (grown, checkpoint)


def test_spectra_of_an_adapter_peft_saved_match_peft_delta_weights(tmp_path):
    """PEFT writes the adapter (rank_pattern, alpha_pattern, rsLoRA) and computes each ΔW itself
    (`get_delta_weight`); our factored singular values must be those of PEFT's dense ΔW."""
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True,
                             use_rslora=True, rank_pattern={"h.1.attn.c_attn": 6}, alpha_pattern={"c_fc": 3})
    model = peft.get_peft_model(tiny_model(), config)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g))
    model.save_pretrained(tmp_path / "peft")
    deltas = {name.removeprefix("base_model.model."): module.get_delta_weight("default")
              for name, module in model.named_modules() if hasattr(module, "get_delta_weight")
              and "default" in getattr(module, "lora_A", {})}
    analysis = adapter_rank.analyze_adapter(tmp_path / "peft")
    assert {x.name for x in analysis.layers} == set(deltas)
    for layer in analysis.layers:
        dense = torch.linalg.svdvals(deltas[layer.name].double())[: len(layer.singular_values)]
        assert list(layer.singular_values) == pytest.approx(dense.tolist(), rel=1e-5)
    assert {x.name: x.rank for x in analysis.layers}["transformer.h.1.attn.c_attn"] == 6


def test_analyze_and_diff_show_a_module_the_same_way_round(tmp_path):
    """GPT-2's Conv1D stores its weight (in, out); the adapter's B·A is (out, in). Both tables show
    out x in, read off the module itself."""
    model = tiny_model()
    model.save_pretrained(tmp_path / "base")
    with torch.no_grad():
        model.transformer.h[0].attn.c_attn.weight.add_(1.0)
    model.save_pretrained(tmp_path / "tuned")
    conv = model.transformer.h[0].attn.c_attn
    expected = f"{conv.nf}x{conv.weight.shape[0]}"  # out x in
    assert conv.nf != conv.weight.shape[0]

    def shape_of(output: str, layer: str) -> str:
        line = next(x for x in output.splitlines() if x.startswith(layer + " "))
        return line.split()[1]

    diff = run("adapter", "diff", str(tmp_path / "base"), str(tmp_path / "tuned"), "--include", "c_attn")
    analyze = run("adapter", "analyze", str(gpt2_adapter(tmp_path)))
    assert diff.exit_code == 0 and analyze.exit_code == 0, diff.output + analyze.output
    assert "out x in" in diff.output and "out x in" in analyze.output
    assert shape_of(diff.output, "transformer.h.0.attn.c_attn") == expected
    assert shape_of(analyze.output, "transformer.h.0.attn.c_attn") == expected
