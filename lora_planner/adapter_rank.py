"""What a trained adapter learned, and whether a smaller rank would do.

Three verbs over files in PEFT's layout (`adapter_model.safetensors` with tensors named
`base_model.model.<module>.lora_A.weight` / `lora_B.weight`, and `adapter_config.json`):

- `analyze_adapter`: per adapted layer, the singular values of ΔW = scaling·B·A from the factors
  (`spectrum.factored_singular_values`, never a d x k matrix), the ranks holding 90/95/99% of the
  energy, and a summary with a recommended rank and what it saves;
- `resize_adapter`: the best rank-k approximation of every ΔW (k fixed or chosen per layer), written
  back in PEFT's layout;
- `diff_checkpoints`: the same analysis for a full fine-tune, ΔW = W_after - W_before, read tensor by
  tensor from two safetensors checkpoints so that only one layer's pair is ever in memory.

A layer's scaling follows PEFT (`LoraLayer.update_layer`): alpha / r, or alpha / sqrt(r) with
`use_rslora`, where r and alpha come from `rank_pattern` / `alpha_pattern` when a pattern matches the
module (PEFT's `get_pattern_key`: the first key K with `re.match(rf"(.*\\.)?({K})$", module)`), else
from `r` / `lora_alpha`.

torch and safetensors are imported inside the functions that read or write tensors.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from . import spectrum
from .architecture import Param
from .checkpoint_sizes import safetensors_bytes
from .errors import PlanError
from .files import default_mode, replacing_folder
from .precision import SAFETENSORS_DTYPE

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_FILES = (ADAPTER_WEIGHTS, ADAPTER_CONFIG)  # what a resize writes, and may replace
PEFT_PREFIX = "base_model.model."
DEFAULT_KEEP = 0.9  # the energy share the recommended rank keeps in every layer

_DTYPE_NAMES = {v: k for k, v in SAFETENSORS_DTYPE.items()}
# `<module>.lora_A.weight`, `<module>.lora_A.<adapter>.weight`, `<module>.lora_embedding_A`, ...
_LORA_KEY = re.compile(
    r"^(?P<module>.+)\.lora_(?P<embedding>embedding_)?(?P<factor>[AB])(?P<rest>(\.[^.]+)*)$")


# ---------------------------------------------------------------------------------------------
# Reading an adapter


@dataclass(frozen=True)
class LoraModule:
    """One adapted module as stored: its tensor names and the factors' stored shapes."""

    name: str  # the module's path in the base model, e.g. model.layers.0.self_attn.q_proj
    key_a: str
    key_b: str
    shape_a: tuple[int, ...]  # (r, in) or (r, in, kh, kw) for a convolution
    shape_b: tuple[int, ...]  # (out, r) or (out, r, 1, 1)
    embedding: bool  # PEFT's embedding LoRA stores A (r, vocab) and B (dim, r) and applies (B A)ᵀ
    rank: int
    scaling: float

    @property
    def shape(self) -> tuple[int, int]:
        """ΔW's shape as (out, in): (d, k) with B (d, r) and A (r, k), flattened for convolutions."""
        return (self.shape_b[0], math.prod(self.shape_a[1:]))


@dataclass(frozen=True)
class AdapterSource:
    """An adapter on disk: where its tensors and config are, and what is in them."""

    weights: Path
    config: dict | None
    modules: tuple[LoraModule, ...]
    other_keys: tuple[str, ...]  # saved modules, biases, DoRA magnitudes: copied through on resize
    dtype: str  # fp32 | bf16 | fp16, the LoRA tensors' dtype
    notes: tuple[str, ...] = ()

    @property
    def params(self) -> int:
        return sum(math.prod(m.shape_a) + math.prod(m.shape_b) for m in self.modules)


def pattern_value(patterns: dict, module: str, default):
    """PEFT's `rank_pattern` / `alpha_pattern` lookup: the first key K whose regex matches the end of
    the module path at a dot boundary (`re.match(rf"(.*\\.)?({K})$", module)`), else `default`."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def layer_scaling(config: dict, module: str) -> tuple[int, float, float]:
    """(r, alpha, scaling) of one module under an adapter config: alpha/r, or alpha/sqrt(r) (rsLoRA)."""
    r = int(pattern_value(config.get("rank_pattern"), module, config.get("r", 8)))
    alpha = float(pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", 8)))
    scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    return r, alpha, scaling


def _find_weights(path: Path) -> tuple[Path, Path | None]:
    if path.is_dir():
        weights = path / ADAPTER_WEIGHTS
        if not weights.is_file():
            if (path / "adapter_model.bin").is_file():
                raise PlanError(f"{path} holds adapter_model.bin; only safetensors files are read "
                                "(save with safe_serialization=True)")
            raise PlanError(f"no {ADAPTER_WEIGHTS} in {path}")
        config = path / ADAPTER_CONFIG
    elif path.is_file():
        if path.suffix != ".safetensors":
            raise PlanError(f"{path} is not a .safetensors file or an adapter folder")
        weights, config = path, path.parent / ADAPTER_CONFIG
    else:
        raise PlanError(f"no such file or folder: {path}")
    return weights, (config if config.is_file() else None)


def read_config(path: Path) -> dict:
    """An adapter_config.json, with every value the analysis reads checked (`check_config`)."""
    from .validate import read_json_file

    config = read_json_file(path, what="adapter config")
    if not isinstance(config, dict):
        raise PlanError(f"{path} is not a JSON object")
    if config.get("peft_type", "LORA") != "LORA":
        raise PlanError(f"{path}: peft_type {config.get('peft_type')!r}; "
                        "only LoRA adapters have a B·A update")
    check_config(config, str(path))
    return config


# |lora_alpha| at most this: recipes use 8 to a few hundred; far larger ones square past float
# range in the energy sums.
MAX_ALPHA = 1e6


def check_config(config: dict, where: str) -> None:
    """The values PEFT's scaling reads: `r` and `rank_pattern` ranks whole numbers from 1,
    `lora_alpha` and `alpha_pattern` values finite and at most `MAX_ALPHA` in size, `use_rslora`
    true or false, and every pattern key a regex PEFT can compile (as `(.*\\.)?(KEY)$`). Each
    failure is one line naming the field."""
    from .validate import MAX_LORA_RANK, flag, real_number, regex, whole_number

    whole_number(f"{where}: r", config.get("r", 8), 1, MAX_LORA_RANK)
    real_number(f"{where}: lora_alpha", config.get("lora_alpha", 8), -MAX_ALPHA, MAX_ALPHA)
    flag(f"{where}: use_rslora", config.get("use_rslora"), False)
    for field_name in ("rank_pattern", "alpha_pattern"):
        patterns = config.get(field_name)
        if patterns is None:
            continue
        if not isinstance(patterns, dict):
            raise PlanError(f"{where}: {field_name} must be an object of regex -> value, "
                            f"got {type(patterns).__name__}")
        for key, value in patterns.items():
            regex(f"{where}: {field_name} key", rf"(.*\.)?({key})$", max_length=10_000, shown=key)
            if field_name == "rank_pattern":
                whole_number(f"{where}: rank_pattern[{key[:40]!r}]", value, 1, MAX_LORA_RANK)
            else:
                real_number(f"{where}: alpha_pattern[{key[:40]!r}]", value, -MAX_ALPHA, MAX_ALPHA)


def open_adapter(path: str | Path) -> AdapterSource:
    """Read an adapter's layout (names, shapes, ranks, scalings) without loading its tensors.

    `path` is an adapter folder or a .safetensors file; its `adapter_config.json` (beside the file)
    gives each layer's scaling. Without one, scaling is taken as 1 and a note says so.
    """
    from safetensors import safe_open

    weights, config_path = _find_weights(Path(path))
    config = read_config(config_path) if config_path else None
    notes: list[str] = []
    if config is None:
        notes.append("no adapter_config.json: every scaling taken as 1 (ΔW = B·A)")
    factors: dict[str, dict[str, tuple[str, tuple[int, ...], bool]]] = {}
    other: list[str] = []
    adapter_names: set[str] = set()
    dtypes: Counter = Counter()
    try:
        with safe_open(str(weights), "pt") as f:
            for key in f.keys():
                match = _LORA_KEY.match(key)
                if not match:
                    other.append(key)
                    continue
                rest = [part for part in match["rest"].split(".") if part and part != "weight"]
                adapter_names.update(rest)
                piece = f.get_slice(key)
                shape = tuple(piece.get_shape())
                dtypes[piece.get_dtype()] += 1
                module = match["module"].removeprefix(PEFT_PREFIX)
                factors.setdefault(module, {})[match["factor"]] = (key, shape, bool(match["embedding"]))
    except Exception as exc:  # noqa: BLE001 - a bad header is a SafetensorError, OSError or ValueError
        raise PlanError(f"cannot read {weights}: {exc}") from None
    if len(adapter_names) > 1:
        raise PlanError(f"{weights} holds several adapters ({', '.join(sorted(adapter_names))}); "
                        "save each on its own")
    modules = []
    for name in sorted(factors, key=_natural):
        pair = factors[name]
        if set(pair) != {"A", "B"}:
            raise PlanError(f"{weights}: {name} has lora_{''.join(pair)} but not both lora_A and lora_B")
        (key_a, shape_a, embedding), (key_b, shape_b, _) = pair["A"], pair["B"]
        # An embedding's A is (r, vocab) and B (dim, r), ΔW = (B A)ᵀ: the same singular values.
        rank = shape_a[0]
        if len(shape_a) < 2 or len(shape_b) < 2 or shape_b[1] != rank:
            raise PlanError(f"{weights}: {name}'s lora_A {list(shape_a)} and lora_B {list(shape_b)} "
                            "do not make a product B·A")
        if config is None:
            scaling = 1.0
        else:
            r, _, scaling = layer_scaling(config, name)
            if r != rank:
                raise PlanError(f"{name}: adapter_config.json gives r={r} but the tensors have rank {rank}")
        modules.append(LoraModule(name, key_a, key_b, shape_a, shape_b, embedding, rank, scaling))
    if not modules:
        raise PlanError(f"{weights} holds no lora_A / lora_B tensors")
    if any("lora_magnitude_vector" in k for k in other):
        notes.append("DoRA adapter: analysed is the low-rank update s·B·A; the magnitude vectors are "
                     "copied through unchanged")
    if len(dtypes) > 1:
        notes.append(f"mixed tensor dtypes {dict(dtypes)}; sizes use the most common one")
    stored = dtypes.most_common(1)[0][0]
    if stored not in _DTYPE_NAMES:
        raise PlanError(f"{weights}: LoRA tensors in {stored}; fp32, bf16 and fp16 are read")
    return AdapterSource(weights, config, tuple(modules), tuple(other), _DTYPE_NAMES[stored], tuple(notes))


def _natural(name: str) -> list:
    """Sort key that puts layer 2 before layer 10."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def iter_factors(source: AdapterSource) -> Iterator[tuple[LoraModule, object, object]]:
    """Each module with its factors as 2-D tensors: B (d, r), A (r, k), loaded one module at a time."""
    import torch
    from safetensors import safe_open

    with safe_open(str(source.weights), "pt") as f:
        for m in source.modules:
            a = f.get_tensor(m.key_a)
            b = f.get_tensor(m.key_b)
            for key, factor in ((m.key_a, a), (m.key_b, b)):
                # an SVD of NaN or infinity does not converge (LinAlgError); say which tensor
                if factor.is_floating_point() and not bool(torch.isfinite(factor).all()):
                    raise PlanError(f"{source.weights}: {key} holds NaN or infinite values")
            yield m, b.reshape(b.shape[0], m.rank), a.reshape(m.rank, -1)  # (d, r), (r, k)


# ---------------------------------------------------------------------------------------------
# Analysis


@dataclass(frozen=True)
class LayerSpectrum:
    """One layer's update: its shape (out, in), rank, and singular values (descending)."""

    name: str
    shape: tuple[int, int]
    rank: int  # the adapter's r, or min(out, in) for a dense update
    singular_values: tuple[float, ...]
    scaling: float | None = None  # None for a dense update

    def energy_rank(self, level: float) -> int:
        return spectrum.energy_rank(self.singular_values, level)

    def to_dict(self, levels: Sequence[float] = spectrum.ENERGY_LEVELS) -> dict:
        values = {"name": self.name, "shape": list(self.shape), "rank": self.rank}
        if self.scaling is not None:
            values["scaling"] = self.scaling
        values["singular_values"] = list(self.singular_values)
        values["energy_rank"] = {_level_key(x): self.energy_rank(x) for x in levels}
        values["cumulative_energy"] = spectrum.cumulative_energy(self.singular_values)
        return values


def _level_key(level: float) -> str:
    return f"{level:g}"


@dataclass(frozen=True)
class Analysis:
    """A spectrum analysis: what was read (`source`), one `LayerSpectrum` per layer, a summary."""

    kind: str  # adapter | diff
    source: dict
    layers: tuple[LayerSpectrum, ...]
    summary: dict
    notes: tuple[str, ...] = ()
    levels: tuple[float, ...] = spectrum.ENERGY_LEVELS

    def to_dict(self) -> dict:
        return {
            self.kind: self.source,
            "layers": [layer.to_dict(self.levels) for layer in self.layers],
            "summary": self.summary,
            "notes": list(self.notes),
        }


def _rank_stats(layers: Sequence[LayerSpectrum], levels: Sequence[float]) -> dict:
    stats = {}
    for level in levels:
        ranks = [layer.energy_rank(level) for layer in layers]
        stats[_level_key(level)] = {"min": min(ranks), "median": statistics.median(ranks), "max": max(ranks)}
    return stats


def lora_params(shape: tuple[int, int], rank: int) -> int:
    """Parameters of a rank-r LoRA pair on a (d, k) layer: B (d, r) + A (r, k) = r·(d + k)."""
    return rank * (shape[0] + shape[1])


def adapter_file_params(source: AdapterSource, ranks: dict[str, int]) -> list[Param]:
    """The tensors of the adapter file with each module at `ranks[name]`, others kept as they are."""
    params = []
    for m in source.modules:
        k = ranks.get(m.name, m.rank)
        params.append(Param(m.key_a, (k, *m.shape_a[1:])))
        params.append(Param(m.key_b, (m.shape_b[0], k, *m.shape_b[2:])))
    return params


def _other_params(source: AdapterSource) -> list[Param]:
    from safetensors import safe_open

    with safe_open(str(source.weights), "pt") as f:
        return [Param(k, tuple(f.get_slice(k).get_shape())) for k in source.other_keys]


def adapter_summary(source: AdapterSource, layers: Sequence[LayerSpectrum], levels: Sequence[float],
                    keep: float) -> dict:
    """Energy ranks across layers, and a recommended rank with what it saves.

    The recommended rank R is the largest of the layers' energy ranks at `keep`: every layer keeps at
    least that share of its update at rank R. Parameters count r·(d + k) per layer; file sizes are
    safetensors files (`checkpoints.safetensors_bytes`) with the same names at the new ranks, in the
    adapter's own dtype. The per-layer (dynamic) alternative gives each layer its own energy rank.
    """
    recommended = max(1, max(layer.energy_rank(keep) for layer in layers))
    per_layer = {layer.name: max(1, min(layer.energy_rank(keep), layer.rank)) for layer in layers}
    uniform = {m.name: min(recommended, m.rank) for m in source.modules}
    others = _other_params(source)

    def size(ranks: dict[str, int]) -> dict:
        params = sum(lora_params(m.shape, ranks.get(m.name, m.rank)) for m in source.modules)
        return {"params": params,
                "bytes": safetensors_bytes(adapter_file_params(source, ranks) + others, source.dtype)}

    now, at_rank, dynamic = size({}), size(uniform), size(per_layer)
    return {
        "layers": len(layers),
        "energy_rank": _rank_stats(layers, levels),
        "keep": keep,
        "recommended_rank": recommended,
        "recommended_rule": f"the largest energy rank at {keep:g}: every layer keeps >= {keep:g} of "
                            "its energy (sum of squared singular values)",
        "now": now,
        "at_recommended_rank": at_rank,
        "per_layer_ranks": dynamic | {"ranks": per_layer},
        "saved": {"params": now["params"] - at_rank["params"], "bytes": now["bytes"] - at_rank["bytes"]},
    }


def analyze_adapter(path: str | Path, levels: Sequence[float] = spectrum.ENERGY_LEVELS,
                    keep: float = DEFAULT_KEEP) -> Analysis:
    """Singular values of every layer's ΔW = scaling·B·A (from the factors), and a summary."""
    levels = _check_levels(levels, keep)
    source = open_adapter(path)
    layers = tuple(
        LayerSpectrum(m.name, m.shape, m.rank, tuple(spectrum.factored_singular_values(b, a, m.scaling)),
                      m.scaling)
        for m, b, a in iter_factors(source))
    config = source.config or {}
    ranks = sorted({m.rank for m in source.modules})
    info = {
        "path": str(path),
        "weights": str(source.weights),
        "r": config.get("r", ranks[-1]) if config else ranks[-1],
        "ranks": ranks,
        "lora_alpha": config.get("lora_alpha"),
        "use_rslora": bool(config.get("use_rslora", False)),
        "rank_pattern": config.get("rank_pattern") or {},
        "alpha_pattern": config.get("alpha_pattern") or {},
        "base_model": config.get("base_model_name_or_path"),
        "dtype": source.dtype,
        "modules": len(source.modules),
        "params": source.params,
        "file_bytes": source.weights.stat().st_size,
    }
    return Analysis("adapter", info, layers, adapter_summary(source, layers, levels, keep),
                    source.notes, levels)


def _check_levels(levels: Sequence[float], keep: float) -> tuple[float, ...]:
    levels = tuple(sorted(set(levels)))
    for level in (*levels, keep):
        if not 0.0 < level <= 1.0:
            raise PlanError(f"an energy share must be in (0, 1], got {level:g}")
    return levels


def planner_savings(analysis: Analysis, model: str, setup=None, gpu_name: str | None = None) -> dict:
    """Memory of training `model` with this adapter's targets at its rank and at the recommended rank,
    through the planner (`plan.make_plan`): peak, adapter checkpoint and trainable parameters.

    The targets are the adapted modules' leaf names (q_proj, c_attn, ...), matched as PEFT matches
    them; the planner's count of wrapped modules is reported so a partial adapter shows up."""
    from .gpus import DEFAULT_GPU, get_gpu
    from .plan import make_plan
    from .resolve import resolve_model
    from .spec import TrainSetup, default_seq_len

    spec = resolve_model(model)
    base = setup or TrainSetup()
    if not base.seq_len:  # no --seq-len: the planner's default for this model
        base = base.with_(seq_len=default_seq_len(spec))
    targets = tuple(sorted({layer.name.rsplit(".", 1)[-1] for layer in analysis.layers}))
    rank_now = max(layer.rank for layer in analysis.layers)
    rank_new = analysis.summary["recommended_rank"]
    setups = tuple(base.with_(method="lora", rank=r, targets=targets) for r in (rank_now, rank_new))
    plan = make_plan(spec, setups, get_gpu(gpu_name or DEFAULT_GPU))
    rows = [{"rank": p.rank, "peak_bytes": p.memory["peak"].bytes, "checkpoint_bytes": p.checkpoint.bytes,
             "trainable_params": p.trainable_params} for p in plan.plans]
    notes = []
    if plan.plans[0].wrapped_modules != len(analysis.layers):
        notes.append(f"the planner wraps {plan.plans[0].wrapped_modules} modules for targets "
                     f"{', '.join(targets)} in {spec.name}; the adapter has {len(analysis.layers)}")
    return {
        "model": spec.name,
        "model_arg": model,
        "gpu": plan.gpu.name,
        "targets": list(targets),
        "batch_size": base.batch_size,
        "seq_len": base.seq_len,
        "precision": base.precision,
        "now": rows[0],
        "at_recommended_rank": rows[1],
        "saved_peak_bytes": rows[0]["peak_bytes"] - rows[1]["peak_bytes"],
        "notes": notes,
    }


# ---------------------------------------------------------------------------------------------
# Resizing


@dataclass(frozen=True)
class ResizedLayer:
    name: str
    shape: tuple[int, int]
    rank: int
    new_rank: int
    frobenius_error: float  # relative: ||ΔW - ΔW_k||_F / ||ΔW||_F


@dataclass(frozen=True)
class Resized:
    output: Path
    criterion: spectrum.Criterion
    layers: tuple[ResizedLayer, ...]
    config: dict
    params: tuple[int, int]  # before, after
    file_bytes: tuple[int, int]  # before, after
    notes: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict:
        return {
            "output": str(self.output),
            "criterion": {"kind": self.criterion.kind, "value": self.criterion.value,
                          "rule": self.criterion.describe()},
            "alpha_rule": ALPHA_RULE,
            "r": self.config["r"],
            "rank_pattern": self.config.get("rank_pattern", {}),
            "params": {"before": self.params[0], "after": self.params[1]},
            "file_bytes": {"before": self.file_bytes[0], "after": self.file_bytes[1]},
            "layers": [{"name": x.name, "shape": list(x.shape), "rank": x.rank, "new_rank": x.new_rank,
                        "frobenius_error": x.frobenius_error} for x in self.layers],
            "notes": list(self.notes),
        }


ALPHA_RULE = ("lora_alpha and alpha_pattern are kept; each layer's scaling becomes alpha/k "
              "(alpha/sqrt(k) with rsLoRA) at its new rank k, and the factors are B' = U_k·sqrt(Σ_k/s'), "
              "A' = sqrt(Σ_k/s')·V_kᵀ, so s'·B'·A' is exactly the best rank-k approximation of ΔW")


def truncated_factors(b, a, scaling: float, keep: int, new_scaling: float):
    """Factors (B' (d, k), A' (k, in)) with new_scaling·B'·A' = the best rank-k approximation of
    scaling·B·A: the top k singular triplets, each σ split evenly between the two factors."""
    import torch

    u, s, vh = spectrum.factored_svd(b, a, scaling)  # (d, q), (q,), (q, k)
    k = min(keep, s.numel())
    root = torch.sqrt(s[:k] / new_scaling)  # (k,)
    new_b = u[:, :k] * root  # (d, k)
    new_a = root[:, None] * vh[:k]  # (k, in)
    if k < keep:  # a layer of fewer directions than asked: pad with zero directions
        new_b = torch.cat([new_b, new_b.new_zeros(new_b.shape[0], keep - k)], dim=1)
        new_a = torch.cat([new_a, new_a.new_zeros(keep - k, new_a.shape[1])], dim=0)
    return new_b, new_a, s.tolist()


def resize_adapter(path: str | Path, criterion: spectrum.Criterion, output: str | Path) -> Resized:
    """Write the best rank-k approximation of every layer's ΔW to `output` in PEFT's layout.

    k comes from `criterion` per layer (never above the layer's rank, at least 1). The config keeps
    everything but `r` (the most common new rank) and `rank_pattern` (each layer whose rank differs
    from `r`, by its escaped full path); `lora_alpha` is unchanged (see `ALPHA_RULE`). Tensors that
    are not LoRA factors (saved modules, biases, DoRA magnitudes) are copied through.
    """
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    source = open_adapter(path)
    if source.config is None:
        raise PlanError(f"{path}: resizing needs adapter_config.json for each layer's alpha")
    # the new factors are sqrt(σ / scaling'): a scaling of 0 or below has no such factors
    flat = [m.name for m in source.modules if layer_scaling(source.config, m.name)[1] <= 0]
    if flat:
        raise PlanError(f"{path}: resizing needs lora_alpha above 0; {flat[0]} has "
                        f"{layer_scaling(source.config, flat[0])[1]:g}")
    output = Path(output)
    if output.resolve() == source.weights.parent.resolve():
        raise PlanError("the output folder is the adapter's own folder; write the resized adapter elsewhere")
    config = dict(source.config)
    notes = list(source.notes)
    keeps = {}
    tensors: dict[str, torch.Tensor] = {}
    layers = []
    for m, b, a in iter_factors(source):
        values = spectrum.factored_singular_values(b, a, m.scaling)
        k = criterion.keep(values)
        keeps[m.name] = k
        _, alpha, _ = layer_scaling(config, m.name)
        new_scaling = alpha / math.sqrt(k) if config.get("use_rslora") else alpha / k
        new_b, new_a, _ = truncated_factors(b, a, m.scaling, k, new_scaling)
        tensors[m.key_b] = new_b.reshape(m.shape_b[0], k, *m.shape_b[2:]).to(b.dtype).contiguous()
        tensors[m.key_a] = new_a.reshape(k, *m.shape_a[1:]).to(a.dtype).contiguous()
        layers.append(ResizedLayer(m.name, m.shape, m.rank, k, spectrum.frobenius_error(values, k)))
    if criterion.kind == "rank" and any(m.rank < criterion.value for m in source.modules):
        notes.append(f"layers of rank below {int(criterion.value)} keep their own rank")
    with safe_open(str(source.weights), "pt") as f:
        for key in source.other_keys:
            tensors[key] = f.get_tensor(key)
    counts = Counter(keeps.values())
    r = max(counts, key=lambda k: (counts[k], k))
    config["r"] = r
    config["rank_pattern"] = {re.escape(name): k for name, k in keeps.items() if k != r}
    # Weights and config go into a temporary folder that is renamed into place: a failure between
    # the two files must not leave new weights beside an old config.
    with replacing_folder(output, ADAPTER_FILES) as folder:
        save_file(tensors, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (folder / ADAPTER_WEIGHTS).chmod(default_mode())  # safetensors writes 0600
        (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    after = sum(lora_params(m.shape, keeps[m.name]) for m in source.modules)
    return Resized(output, criterion, tuple(layers), config, (source.params, after),
                   (source.weights.stat().st_size, (output / ADAPTER_WEIGHTS).stat().st_size), tuple(notes))


# ---------------------------------------------------------------------------------------------
# A full fine-tune's update


def checkpoint_files(path: str | Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it: a file, a folder with `model.safetensors`, a
    sharded folder (`model.safetensors.index.json`), or a folder of *.safetensors files."""
    from safetensors import safe_open

    path = Path(path)
    if path.is_file():
        if path.suffix != ".safetensors":
            raise PlanError(f"{path} is not a .safetensors file")
        files = [path]
    elif path.is_dir():
        index = path / "model.safetensors.index.json"
        if index.is_file():
            return _index_files(path, index)
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise PlanError(f"no .safetensors files in {path}")
    else:
        raise PlanError(f"no such file or folder: {path}")
    names: dict[str, Path] = {}
    for file in files:
        try:
            with safe_open(str(file), "pt") as f:
                names |= dict.fromkeys(f.keys(), file)
        except Exception as exc:  # noqa: BLE001 - a bad header is a SafetensorError, OSError or ValueError
            raise PlanError(f"cannot read {file}: {exc}") from None
    return names


def _index_files(folder: Path, index: Path) -> dict[str, Path]:
    """A sharded checkpoint's `weight_map` (tensor name -> shard file name). Every shard must be a
    .safetensors file inside `folder`: a name such as ../../etc/passwd or /etc/passwd is refused,
    never opened."""
    from .validate import read_json_file

    data = read_json_file(index, what="checkpoint index", max_bytes=64 * 2**20)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise PlanError(f"{index}: weight_map must be an object of tensor name -> shard file name")
    root = folder.resolve()
    files: dict[str, Path] = {}
    for name in set(weight_map.values()):
        file = (folder / name).resolve()
        if file.parent != root or file.suffix != ".safetensors":
            raise PlanError(f"{index}: shard {name[:80]!r} is not a .safetensors file in {folder}")
        if not file.is_file():
            raise PlanError(f"{index}: shard {name[:80]!r} is missing from {folder}")
        files[name] = folder / name
    return {k: files[v] for k, v in weight_map.items()}


def _shapes(files: dict[str, Path]) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    shapes = {}
    for file in sorted(set(files.values())):
        try:
            with safe_open(str(file), "pt") as f:
                for key in f.keys():
                    if files.get(key) == file:
                        shapes[key] = tuple(f.get_slice(key).get_shape())
        except Exception as exc:  # noqa: BLE001 - a bad header is a SafetensorError, OSError or ValueError
            raise PlanError(f"cannot read {file}: {exc}") from None
    return shapes


def diff_checkpoints(base: str | Path, finetuned: str | Path, include: str | None = None,
                     levels: Sequence[float] = spectrum.ENERGY_LEVELS,
                     keep: float = DEFAULT_KEEP) -> Analysis:
    """Singular values of W_finetuned - W_base for every weight of two or more dimensions present
    in both checkpoints with one shape (and matching the regex `include`).

    Streams: one tensor of each checkpoint is loaded at a time, the difference is taken in float32
    and decomposed (in float64 when it has at most 2^22 entries), then dropped.
    """
    from safetensors import safe_open

    levels = _check_levels(levels, keep)
    base_files, tuned_files = checkpoint_files(base), checkpoint_files(finetuned)
    base_shapes, tuned_shapes = _shapes(base_files), _shapes(tuned_files)
    pattern = re.compile(include) if include else None
    notes = []
    keys, mismatched = [], []
    for key in sorted(tuned_shapes, key=_natural):
        shape = tuned_shapes[key]
        if len(shape) < 2 or key not in base_shapes or (pattern and not pattern.search(key)):
            continue
        if base_shapes[key] != shape:
            mismatched.append(key)
            continue
        keys.append(key)
    if mismatched:
        notes.append(f"{len(mismatched)} tensors differ in shape and are left out: "
                     f"{', '.join(mismatched[:5])}")
    missing = sorted(set(base_shapes) ^ set(tuned_shapes))
    if missing:
        notes.append(f"{len(missing)} tensors are in only one checkpoint: {', '.join(missing[:5])}")
    if not keys:
        raise PlanError("no weight of two or more dimensions is in both checkpoints"
                        + (f" and matches {include!r}" if include else ""))
    def read(file: Path, key: str):
        # Opened per tensor: a handle kept open would keep every page it mapped resident.
        with safe_open(str(file), "pt") as f:
            return f.get_tensor(key).float()

    layers = []
    for key in keys:
        delta = read(tuned_files[key], key)
        delta -= read(base_files[key], key)  # in place: the pair never exists beside a third copy
        # one sum, no tensor-sized mask: NaN or infinity anywhere makes it non-finite (an SVD of
        # them does not converge)
        if not math.isfinite(float(delta.sum())):
            raise PlanError(f"{key}: the update holds NaN or infinite values (or values past float32's "
                            "range)")
        values = spectrum.dense_singular_values(delta)
        shape = (delta.shape[0], math.prod(delta.shape[1:]))
        del delta
        layers.append(LayerSpectrum(key.removesuffix(".weight"), shape, min(shape), tuple(values)))
    info = {"base": str(base), "finetuned": str(finetuned), "include": include, "tensors": len(layers),
            "params": sum(math.prod(layer.shape) for layer in layers)}
    return Analysis("diff", info, tuple(layers), diff_summary(layers, levels, keep), tuple(notes), levels)


def diff_summary(layers: Sequence[LayerSpectrum], levels: Sequence[float], keep: float) -> dict:
    """How low-rank a full update was: energy ranks across tensors, each also as a share of the
    tensor's full rank min(d, k), and the LoRA rank R that would hold `keep` of every tensor's update
    (the largest energy rank) with its parameters r·(d + k) against the tensors' own d·k."""
    stats = _rank_stats(layers, levels)
    for level in levels:
        shares = [layer.energy_rank(level) / layer.rank for layer in layers]
        stats[_level_key(level)]["median_share_of_full_rank"] = statistics.median(shares)
    rank = max(1, max(layer.energy_rank(keep) for layer in layers))
    return {
        "layers": len(layers),
        "energy_rank": stats,
        "keep": keep,
        "recommended_rank": rank,
        "recommended_rule": f"the largest energy rank at {keep:g}: a LoRA of this rank could hold "
                            f">= {keep:g} of every tensor's update",
        "full_params": sum(math.prod(layer.shape) for layer in layers),
        "lora_params_at_recommended_rank": sum(lora_params(layer.shape, min(rank, layer.rank))
                                               for layer in layers),
    }
