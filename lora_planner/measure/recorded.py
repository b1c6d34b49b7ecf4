"""Plan a model of any decoder architecture transformers builds, from transformers' own code.

A `model_type` none of our families lays out is planned in two parts (`lora_planner.recorded`):

- its tensors: the real class built from the config.json on the meta device (no memory, any size),
  with PEFT's adapters applied there for LoRA, gives every parameter's name and shape: parameter
  counts, trainable counts and the model-state bytes are exact;
- its step: the real training step run under `FakeTensorMode` (`traced_step.run_step`, the same step
  `lora-plan trace --fake` records) on the first 1, 2 and 3 decoder layers, at the setup's batch and
  sequence; each phase's most bytes beside the model states is fitted per layer (`fit_line`) and
  scaled to the model's depth.

What is recorded depends on the config, the setup, and the installed transformers and torch, so a
recording is cached on disk under that key (`cache_dir`); asking again reads it back.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import warnings
from dataclasses import asdict, fields
from pathlib import Path

from ..architecture import Param
from ..errors import PlanError
from ..recorded import (
    MOMENT,
    Line,
    RecordedModel,
    RecordedStep,
    fit_line,
    is_adapter,
    recorded_fields,
    recording_setup,
)
from ..spec import SHAPE_LIMITS, TrainSetup
from ..stacks import resolve

# Decoder layers of the slices recorded: the deepest two set the per-layer line, the first checks it
RECORD_DEPTHS = (1, 2, 3)
CACHE_ENV = "LORA_PLAN_CACHE"  # a folder for recordings, instead of $XDG_CACHE_HOME/lora-plan
SCHEMA = 7  # a recording's format; a cache entry of another is recorded again
# what the model's cache entry keeps beside its tensors: what the config class fills in, read when
# planning (the attention dropout it states or defaults to; its layer_types when they mix kinds)
CONFIG_FACTS = ("attention_dropout", "layer_kinds")
LINES = ("activations", "forward", "backward", "backward_gradients", "backward_other",
         "backward_other_gradients")  # `RecordedStep`'s `Line`s
PRESET_TARGETS = {"qv": ("q_proj", "v_proj"), "attn": ("q_proj", "k_proj", "v_proj", "o_proj"),
                  "mlp": ("gate_proj", "up_proj", "down_proj")}
# the precision each plan precision's step is recorded in (a plain PyTorch step realises these)
TRACED_PRECISION = {"fp32": "fp32", "amp": "amp", "pure-bf16": "pure-bf16", "mixed": "pure-bf16",
                    "bf16": "pure-bf16"}


# Dropout probabilities a config may state (those `traced_step.run_step` sets), and of them the
# attention's: recorded as off. A GPU's flash and memory-efficient kernels apply attention dropout
# inside the kernel and save no mask; on CPU, SDPA with dropout falls back to math attention and
# saves the (seq x seq) probabilities, which would overstate a GPU's step many times over.
DROPOUT_KEYS = ("resid_pdrop", "embd_pdrop", "attn_pdrop", "attention_dropout")
ATTENTION_DROPOUT_KEYS = ("attn_pdrop", "attention_dropout")


def config_attention_dropout(config: dict) -> float:
    """The attention dropout the config states, or its config class's default."""
    cfg = hf_config(config, 1)
    return max((float(getattr(cfg, k, 0.0) or 0.0) for k in ATTENTION_DROPOUT_KEYS), default=0.0)


def cache_dir() -> Path:
    """Where recordings are kept: $LORA_PLAN_CACHE, else $XDG_CACHE_HOME/lora-plan, else
    ~/.cache/lora-plan."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lora-plan"


def versions() -> tuple[str, str]:
    """The transformers and the torch whose code is recorded, from their installed metadata: reading
    it imports neither, so a plan answered from the cache never loads torch."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"transformers {version('transformers')}", f"torch {version('torch')}"
    except PackageNotFoundError as exc:
        raise PlanError(f"planning this model_type needs {exc.name} (pip install 'lora-plan[measure]')") \
            from None


def check_config(config: dict) -> str:
    """The config's `model_type`, when transformers builds a causal LM of it; the shapes it states
    within `spec.SHAPE_LIMITS` (as for our own families). Else one line saying why not."""
    from transformers import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    from ..validate import text, whole_number

    model_type = text("config.json model_type", config.get("model_type"))
    # an encoder (BERT) or encoder-decoder (BART) has a masked-LM head too, and a causal head only
    # as a decoder of another model
    if (model_type not in CONFIG_MAPPING or model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
            or model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES or config.get("is_encoder_decoder")):
        from ..spec import unsupported_model_type

        raise unsupported_model_type(model_type)
    keys = {"num_hidden_layers": "num_layers", "n_layer": "num_layers", "hidden_size": "hidden_size",
            "vocab_size": "vocab_size", "num_attention_heads": "num_heads", "intermediate_size":
            "intermediate_size", "max_position_embeddings": "max_positions"}
    for key, limit in keys.items():
        if config.get(key) is not None:
            whole_number(f"config.json {key}", config[key], *SHAPE_LIMITS[limit])
    return model_type


def hf_config(config: dict, layers: int | None = None):
    """transformers' config object of `config`, cut to its first `layers` decoder layers (a list
    with one entry per layer, such as `layer_types`, cut with it)."""
    from transformers import AutoConfig

    cfg = AutoConfig.for_model(**config)
    depth = cfg.num_hidden_layers
    if layers is not None:
        for key, value in list(cfg.to_dict().items()):
            if isinstance(value, list) and len(value) == depth:
                setattr(cfg, key, value[:layers])
        cfg.num_hidden_layers = layers
    cfg.use_cache = False
    return cfg


def _normal(name: str) -> str:
    """A PEFT model's tensor name as the base model (or the adapter file) names it."""
    return name.removeprefix("base_model.model.").replace(".base_layer.", ".").replace(".default", "")


def lora_config(model, model_type: str, setup: TrainSetup):
    """PEFT's `LoraConfig` for the setup's targets on this model: `default` is PEFT's own targets for
    the model_type (q_proj and v_proj where PEFT has none and the model has them, as for Llama);
    presets name the usual modules; module names match as PEFT matches them; re:REGEX a full path."""
    from peft import LoraConfig
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

    leaves = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    names: list[str] = []
    for target in setup.targets:
        if target == "default":
            chosen = DEFAULTS.get(model_type) or (["q_proj", "v_proj"] if {"q_proj", "v_proj"} <= leaves
                                                  else None)
            if chosen is None:
                raise PlanError(f"PEFT has no default LoRA targets for model_type {model_type!r}: pass "
                                "--targets (all-linear, or module names)")
            names += chosen
        else:
            names += PRESET_TARGETS.get(target, (target,))
    names = list(dict.fromkeys(names))
    if "all-linear" in names and len(names) > 1:
        raise PlanError("--targets all-linear is not combined with other targets for this model")
    targets: str | list[str] = names
    if any(n.startswith("re:") for n in names):
        targets = "|".join(f"(?:{n[3:]})" if n.startswith("re:") else rf"(?:.*\.)?{re.escape(n)}"
                           for n in names)
    elif names == ["all-linear"]:
        targets = "all-linear"
    config = LoraConfig(r=setup.rank, lora_alpha=2 * setup.rank, target_modules=targets,
                        lora_dropout=setup.lora_dropout, bias=setup.bias, use_dora=setup.use_dora,
                        modules_to_save=list(setup.modules_to_save) or None)
    return config, tuple(names)


def _peft(model, config, setup: TrainSetup):
    from .traced_step import apply_lora

    with warnings.catch_warnings(), _fake_deepcopy():
        warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
        try:
            return apply_lora(model, config, setup)
        except ValueError as exc:  # PEFT's: a target that matches nothing, a module it cannot wrap
            raise PlanError(f"PEFT refused the targets: {str(exc).splitlines()[0]}") from None


def _fake_deepcopy():
    """PEFT copies each of modules_to_save with `copy.deepcopy`, which would give a fake tensor a
    fake mode of its own that the step's cannot mix with (and whose collection crashes torch): while
    PEFT runs, a module's fake tensors are copied as fresh ones of the same shapes and dtypes made in
    the mode running now (their values do not matter to memory)."""
    import copy
    from unittest import mock

    import torch
    from torch._subclasses.fake_tensor import FakeTensor

    deepcopy = copy.deepcopy

    def fresh(t):
        made = torch.empty(t.shape, dtype=t.dtype)
        return torch.nn.Parameter(made, requires_grad=t.requires_grad) if isinstance(t, torch.nn.Parameter) \
            else made

    def copied(obj, memo=None, _nil=None):
        if isinstance(obj, torch.nn.Module) and memo is None:
            tensors = [*obj.parameters(), *obj.buffers()]
            memo = {id(t): fresh(t) for t in tensors if isinstance(t, FakeTensor)}
        return deepcopy(obj, memo)
    return mock.patch.object(copy, "deepcopy", copied)


def meta_model(config: dict, model_type: str, name: str, source: str) -> RecordedModel:
    """The base model's tensors from the real class built on the meta device (no step yet)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config(config))
    from transformers.pytorch_utils import Conv1D

    from .tracer import decoder_layers

    head = model.get_output_embeddings()
    stack = decoder_layers(model)[0]
    # the layers transformers' bitsandbytes integration quantises (`replace_with_bnb_linear`)
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))]
    layer_class = sorted(model._no_split_modules or [type(model).__name__])[0]
    cfg = model.config
    return RecordedModel(
        name=name, model_type=model_type, source=source, num_layers=cfg.num_hidden_layers,
        hidden_size=cfg.hidden_size, layers_prefix=f"{stack}." if stack else "",
        layer_class=layer_class, versions=versions(),
        params=tuple(Param(n, tuple(p.shape)) for n, p in model.named_parameters()),
        quantisable=tuple(f"{n}.weight" for n, m in linears if m is not head),
        matmul_params=sum(m.weight.numel() for _, m in linears),
        head_params=head.weight.numel() if head is not None else 0,
        max_positions=getattr(cfg, "max_position_embeddings", None) or 0, steps={})


def trainable_tensors(config: dict, model_type: str, setup: TrainSetup) -> dict:
    """The trainable tensors of the whole model under the setup (PEFT applied on the meta device
    for LoRA), adapters first; PEFT's counts beside them."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from transformers import AutoModelForCausalLM

    # DoRA's magnitude starts as the norm of the weight, which a meta tensor cannot give: fake ones can
    place = FakeTensorMode() if setup.use_dora and setup.method != "full" else torch.device("meta")
    with place:
        return _trainable_of(AutoModelForCausalLM.from_config(hf_config(config)), model_type, setup)


def _trainable_of(model, model_type: str, setup: TrainSetup) -> dict:
    """`trainable_tensors` of a model already built (on the meta device or under fake tensors)."""
    from peft.tuners.lora import LoraLayer

    if setup.method == "full":
        params = tuple(Param(n, tuple(p.shape)) for n, p in model.named_parameters())
        return {"trainable": params, "adapter_params": 0, "wrapped_modules": 0, "target_modules": (),
                "all_params": sum(p.numel for p in params)}
    lora, names = lora_config(model, model_type, setup)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model = _peft(model, lora, setup.with_(method="lora"))
    named = [(_normal(n), p) for n, p in model.named_parameters() if p.requires_grad]
    params = tuple(Param(n, tuple(p.shape)) for n, p in sorted(named, key=lambda np: not is_adapter(np[0])))
    return {"trainable": params, "adapter_params": sum(p.numel for p in params if is_adapter(p.name)),
            "wrapped_modules": sum(isinstance(m, LoraLayer) for m in model.modules()),
            "target_modules": names, "all_params": sum(p.numel() for p in model.parameters())}


def traced_setup(setup: TrainSetup) -> TrainSetup:
    """What is run to record a setup's step: QLoRA as LoRA, the precision a plain PyTorch step
    realises (`TRACED_PRECISION`; fp32 adapters keep mixed and bf16, as `trace` runs them), an
    optimizer torch has in its place (the optimizer's own step is planned, not recorded)."""
    from ..adapter_dtype import fp32_adapters
    from ..precision import get_precision

    method = "lora" if setup.method == "qlora" else setup.method
    keep = fp32_adapters(method, get_precision(setup.precision), setup.adapter_dtype)
    precision = setup.precision if keep else TRACED_PRECISION[setup.precision]
    optimizer = setup.optimizer if setup.optimizer in ("adamw", "sgd", "sgd-momentum") else "adamw"
    return setup.with_(method=method, precision=precision, optimizer=optimizer)


def record_slice(config: dict, model_type: str, setup: TrainSetup, layers: int, fake: bool = True,
                 kind: str | None = None, allocator: bool = False):
    """The tracer's report (and allocator reading) of the setup's step on the first `layers` layers
    (with `kind`, every one of them of that kind of `layer_types`)."""
    from .traced_step import run_step

    cfg = hf_config(config, layers)
    if kind is not None:
        cfg.layer_types = [kind] * layers
    if setup.dropout is not None:  # the setup's dropout everywhere, as `run_step` sets it...
        for key in DROPOUT_KEYS:
            if hasattr(cfg, key):
                setattr(cfg, key, setup.dropout)
        setup = setup.with_(dropout=None)
    for key in ATTENTION_DROPOUT_KEYS:  # ...but attention's (see `ATTENTION_DROPOUT_KEYS`)
        if hasattr(cfg, key):
            setattr(cfg, key, 0.0)

    def adapt(model):
        return _peft(model, lora_config(model, model_type, setup)[0], setup)
    # a kernel that refuses the config's shapes is reported in one line, not in fake tensors' log
    fake_log = logging.getLogger("torch._subclasses.fake_tensor")
    level = fake_log.level
    fake_log.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # transformers' renamed checkpointing query
            return run_step(cfg, setup, cfg.vocab_size, fake=fake, allocator=allocator, adapt=adapt)
    finally:
        fake_log.setLevel(level)


def record_step(config: dict, model_type: str, setup: TrainSetup, depths: tuple[int, ...] | None = None,
                fake: bool = True) -> RecordedStep:
    """One setup's step recorded at each of `depths` (consecutive) layers and fitted per layer;
    by default `RECORD_DEPTHS`, those of them the model has (a model of one layer is recorded whole)."""
    if depths is None:
        depths = tuple(d for d in RECORD_DEPTHS if d <= hf_config(config).num_hidden_layers)
    from .traced_step import _check

    run = traced_setup(resolve(setup))
    if run.loss == "fused-linear":
        raise PlanError("--loss fused-linear runs Liger's Triton kernel, which a step recorded on CPU "
                        "cannot run: plan --loss standard or chunked for this model")
    try:
        _check(run)
    except PlanError as exc:
        raise PlanError(f"recording the step: {exc}") from None
    for flag, name in ((run.optimizer_in_backward, "--optimizer-in-backward"),
                       (run.activation_offload, "--activation-offload")):
        if flag:  # the recorded step runs neither (`traced_step.run_step`)
            raise PlanError(f"{name} is not planned for a model recorded from transformers")
    kinds = layer_kinds(config)
    try:
        # a model whose layers are of more than one kind: each kind recorded on its own
        recorded = {kind: [record_slice(config, model_type, run, d, fake, kind)[0] for d in depths]
                    for kind in dict.fromkeys(kinds or [None])}
    except ValueError as exc:
        if "does not support an attention implementation" not in str(exc):
            raise
        raise PlanError(f"transformers runs model_type {model_type!r} without --attention "
                        f"{run.attention}: plan it with --attention eager") from None
    lines = _combined({kind: _lines(reports, depths[0]) for kind, reports in recorded.items()}, kinds)
    last = next(iter(recorded.values()))[-1]
    by_kind = {kind: _positions(reports, depths[0]) for kind, reports in recorded.items()}
    common = set.intersection(*(set(p) for p in by_kind.values()))  # positions every kind reached
    by_kind = {kind: {k: v for k, v in p.items() if k in common} for kind, p in by_kind.items()}
    positions = next(iter(by_kind.values()))
    return RecordedStep(
        traced_precision=run.precision, depths=depths, resident=last.terms["buffers"] + last.terms["inputs"],
        increments={k: v[1] for k, v in lines.items()},
        **{k: v[0] for k, v in lines.items() if k in LINES}, positions=positions,
        layer_kinds=tuple(kinds),
        kind_positions={k: p for k, p in by_kind.items() if kinds and k != kinds[0]},
        **trainable_tensors(config, model_type, setup))


def layer_kinds(config: dict) -> list[str]:
    """The config's `layer_types` (one kind per decoder layer) when it names more than one kind."""
    kinds = getattr(hf_config(config), "layer_types", None) or []
    return list(kinds) if len(set(kinds)) > 1 else []


def _lines(reports: list, first: int) -> dict[str, tuple[Line, tuple[int, ...]]]:
    """Each `LINES` quantity of the step, read from the reports of slices of `first`, `first` + 1,
    ... layers and fitted per layer (`fit_line`), with the increments seen."""
    states = [r.terms["parameters"] + r.terms["optimizer_states"] for r in reports]
    values = {
        "activations": [r.terms["activations"] for r in reports],
        "forward": [r.phase_peaks["forward"] - s for r, s in zip(reports, states, strict=True)],
        "backward": [r.phase_peaks["backward"] - s for r, s in zip(reports, states, strict=True)],
        "backward_gradients": [r.phase_peak_gradients["backward"] for r in reports],
        "backward_other": [sum(r.phase_other_peaks["backward"]) - s
                           for r, s in zip(reports, states, strict=True)],
        "backward_other_gradients": [r.phase_other_peaks["backward"][1] for r in reports],
    }
    return {k: fit_line(first, tuple(v)) for k, v in values.items()}


def _positions(reports: list, first: int) -> dict[str, tuple[Line, ...]]:
    """Backward's positions (`recorded.POSITIONS`) in the reports of slices of `first`, `first` + 1,
    ... layers, each a `recorded.MOMENT` of lines fitted per layer; a position some slice never
    reached (the embeddings, when their output needs no gradient) is left out."""
    values: dict[str, list[tuple[int, ...]]] = {}
    for depth, r in enumerate(reports, first):
        states = r.terms["parameters"] + r.terms["optimizer_states"]
        at = {"head": "head", "top": str(depth - 1), "bottom": "0", "end": "end"}
        for name, key in at.items():
            if key in r.backward_positions:
                most, most_g, other, other_g, entry = r.backward_positions[key]
                values.setdefault(name, []).append((most - states, most_g, other + other_g - states,
                                                    other_g, entry))
    return {name: tuple(fit_line(first, tuple(v[j] for v in seen))[0] for j in range(len(MOMENT)))
            for name, seen in values.items() if len(seen) == len(reports)}


def _combined(by_kind: dict, kinds: list[str]) -> dict[str, tuple[Line, tuple[int, ...]]]:
    """One kind's lines as they are; several kinds' as the line of the first layer's kind with
    every other layer's difference in per-layer bytes put in its base:
    base(first kind) + sum over kinds of (its layers) x (its per-layer bytes), at the model's depth.
    Each kind's increments are kept (as "name (kind)" for the others) to check them apart."""
    if not kinds:
        return next(iter(by_kind.values()))
    first = by_kind[kinds[0]]
    lines = {}
    for name, (line, steps) in first.items():
        extra = sum(kinds.count(kind) * (lines_of[name][0].per_layer - line.per_layer)
                    for kind, lines_of in by_kind.items())
        lines[name] = (Line(line.base + extra, line.per_layer), steps)
        lines.update({f"{name} ({kind})": ((), lines_of[name][1])
                      for kind, lines_of in by_kind.items() if kind != kinds[0]})
    return lines


def _key(config: dict, setup: TrainSetup | None) -> str:
    """The cache name of a recording of `setup` (None: of the model's meta-device build)."""
    text = json.dumps({"schema": SCHEMA, "config": config, "setup": asdict(setup) if setup else None,
                       "versions": versions(), "depths": RECORD_DEPTHS}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


ConfigFacts = tuple[float, tuple[str, ...]]  # `CONFIG_FACTS`'s values


def _model_from_json(data: dict, name: str, source: str) -> tuple[RecordedModel, ConfigFacts]:
    """A cached meta-device build and its `CONFIG_FACTS`, or a ValueError/TypeError/KeyError when it
    is not one."""
    expected = {f.name for f in fields(RecordedModel)} - {"name", "source", "steps", "caveats"}
    if set(data) != expected | set(CONFIG_FACTS):
        raise KeyError("fields")
    data = dict(data)
    facts = (float(data.pop("attention_dropout")), tuple(str(k) for k in data.pop("layer_kinds")))
    data["params"] = tuple(Param(str(n), tuple(int(d) for d in shape)) for n, shape in data["params"])
    data["quantisable"] = tuple(str(q) for q in data["quantisable"])
    data["versions"] = tuple(str(v) for v in data["versions"])
    data["layers_prefix"] = str(data["layers_prefix"])
    for k in ("num_layers", "hidden_size", "matmul_params", "head_params", "max_positions"):
        if not isinstance(data[k], int):
            raise TypeError(k)
    return RecordedModel(name=name, source=source, steps={}, **data), facts


def cached_model(config: dict, name: str, source: str) -> tuple[RecordedModel, ConfigFacts]:
    """`meta_model` of the config and what its config class fills in (`CONFIG_FACTS`), read from the
    cache when built before (so a plan asked again imports neither torch nor transformers), else
    built after `check_config` and written there."""
    from ..files import write_text

    path = cache_dir() / f"{_key(config, None)}.json"
    try:
        return _model_from_json(json.loads(path.read_text()), name, source)
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        pass
    model = meta_model(config, check_config(config), name, source)
    facts = (config_attention_dropout(config), tuple(layer_kinds(config)))
    data = {f.name: getattr(model, f.name) for f in fields(model)
            if f.name not in ("name", "source", "steps", "caveats")}
    data["params"] = [[p.name, list(p.shape)] for p in model.params]
    data.update(zip(CONFIG_FACTS, facts, strict=True))
    try:
        write_text(path, json.dumps(data))
    except OSError:
        pass  # an unwritable cache costs the next run a build, not this one its answer
    return model, facts


def _from_json(data: dict) -> RecordedStep:
    """A cached recording, or a ValueError/TypeError/KeyError when it is not one."""
    if set(data) != set(recorded_fields()):
        raise KeyError("fields")
    data = dict(data)
    for k in LINES:
        data[k] = Line(int(data[k]["base"]), int(data[k]["per_layer"]))
    data["trainable"] = tuple(Param(str(n), tuple(int(d) for d in s)) for n, s in data["trainable"])
    data["depths"] = tuple(int(d) for d in data["depths"])
    data["target_modules"] = tuple(str(t) for t in data["target_modules"])
    data["increments"] = {str(k): tuple(int(i) for i in v) for k, v in data["increments"].items()}
    def positions(lines: dict) -> dict[str, tuple[Line, ...]]:
        return {str(k): tuple(Line(int(x["base"]), int(x["per_layer"])) for x in v) for k, v in lines.items()}
    data["positions"] = positions(data["positions"])
    data["kind_positions"] = {str(k): positions(v) for k, v in data["kind_positions"].items()}
    data["layer_kinds"] = tuple(str(k) for k in data["layer_kinds"])
    for k in ("resident", "adapter_params", "wrapped_modules", "all_params"):
        if not isinstance(data[k], int):
            raise TypeError(k)
    return RecordedStep(**data)


def cached_step(config: dict, model_type: str, setup: TrainSetup) -> RecordedStep:
    """`record_step` of the setup, read from the cache when recorded before (an entry that cannot be
    read back is recorded again and replaced), else recorded and written there."""
    from ..files import write_text

    path = cache_dir() / f"{_key(config, setup)}.json"
    try:
        return _from_json(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        pass
    step = record_step(config, model_type, setup)
    data = {f.name: getattr(step, f.name) for f in fields(step)}
    for k in LINES:
        data[k] = asdict(data[k])
    data["trainable"] = [[p.name, list(p.shape)] for p in step.trainable]
    def positions(lines: dict) -> dict:
        return {k: [asdict(x) for x in v] for k, v in lines.items()}
    data["positions"] = positions(step.positions)
    data["kind_positions"] = {k: positions(v) for k, v in step.kind_positions.items()}
    try:
        write_text(path, json.dumps(data))
    except OSError:
        pass  # an unwritable cache costs the next run a recording, not this one its answer
    return step


def recorded_model(config: dict, name: str, source: str, setups: tuple[TrainSetup, ...]) -> RecordedModel:
    """The model of `config` with every setup's step recorded (or read from the cache); a setup
    planned later (--fit, advice) is recorded when first asked for (`RecordedModel.recorder`)."""
    from dataclasses import replace

    if any(s.task != "causal-lm" for s in setups):
        raise PlanError("a model recorded from transformers is planned for --task causal-lm only")
    model, (config_dropout, kinds) = _refusals(config.get("model_type"),
                                               lambda: cached_model(config, name, source))
    model_type = model.model_type

    def record(key: TrainSetup) -> RecordedStep:
        if key.task != "causal-lm":
            raise PlanError("a model recorded from transformers is planned for --task causal-lm only")
        return _refusals(model_type, lambda: cached_step(config, model_type, key))
    steps: dict[TrainSetup, RecordedStep] = {}
    for setup in setups:
        key = recording_setup(resolve(setup))
        if key not in steps:
            steps[key] = record(key)
    caveats = []
    if any(s.attention == "sdpa" and (config_dropout if s.dropout is None else s.dropout) > 0
           for s in setups):
        caveats.append("attention dropout is recorded as off: a GPU's SDPA kernels apply it inside the "
                       "kernel, saving no mask (CPU's would fall back to math attention); other dropout "
                       "masks are recorded at CPU's width, above a GPU's 1 B per element")
    if kinds:
        counts = ", ".join(f"{kinds.count(k)} {k}" for k in dict.fromkeys(kinds))
        caveats.append(f"the config's layer_types mixes layer kinds ({counts}): each kind is recorded on "
                       "its own and its per-layer bytes counted for its layers; the moments of the peak "
                       f"are those of the first layer's kind ({kinds[0]})")
    return replace(model, steps=steps, caveats=tuple(caveats), recorder=record)


def _refusals(model_type, run):
    """`run()`, with transformers' own refusal of this config or this step said in one line (a
    PlanError); a user's mistake said already, or a bug of ours, is raised as it is."""
    try:
        return run()
    except (ValueError, TypeError, KeyError, AttributeError, RuntimeError, NotImplementedError) as exc:
        import traceback

        where = traceback.extract_tb(exc.__traceback__)[-1].filename
        if isinstance(exc, PlanError) or "lora_planner" in where:
            raise
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        raise PlanError(f"transformers could not build or run model_type {model_type!r} from this "
                        f"config: {type(exc).__name__}: {first}") from None


# the keys a config.json may name its depth by (transformers maps each to `num_hidden_layers`)
DEPTH_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


def sliced_config(config: dict, layers: int | None) -> dict:
    """The config.json cut to its first `layers` decoder layers (a list with one entry per layer,
    such as `layer_types`, cut with it); the config itself when `layers` is None or not fewer."""
    depth = hf_config(config).num_hidden_layers
    if layers is None or layers >= depth:
        return config
    key = next((k for k in DEPTH_KEYS if k in config), "num_hidden_layers")
    cut = {k: v[:layers] for k, v in config.items() if isinstance(v, list) and len(v) == depth}
    return {**config, **cut, key: layers}


def trace_recorded(config: dict, name: str, source: str, setup: TrainSetup, layers: int | None = None,
                   fake: bool = False, guard=None):
    """`lora-plan trace` for a model_type planned from its recording: the plan of the model (its
    first `layers` layers), recorded on 1-3 layers and scaled, beside one real (or fake) step of the
    whole of it on CPU (`traced_step.Comparison`), and the model's depth traced. On CPU foreach
    AdamW keeps each tensor's step counter in host memory (4 B), and checkpointing the CPU
    generator's state per layer, made outside every op (the allocator's peak is held against it).
    `guard(peak)`, when given, is called with the planned peak before the step runs (it may refuse)."""
    import torch

    from ..gpus import GPUS
    from ..plan import make_plan
    from .traced_step import Comparison, _check

    setup = resolve(setup)
    _check(setup)
    part = sliced_config(config, layers)
    model = recorded_model(part, name if part is config else f"{name}[:{layers} layers]", source, (setup,))
    plan = make_plan(model, (setup,), GPUS[0]).plans[0]
    counters = 0
    if setup.optimizer == "adamw" and setup.optimizer_impl != "fused":
        counters = 4 * len(model.step(setup).trainable)
    rng = len(torch.get_rng_state()) * model.num_layers if setup.grad_checkpointing else 0
    m = plan.memory
    seen = m["peak"].bytes + counters
    predicted = {"weights": m["weights"].bytes, "gradients": m["gradients"].bytes,
                 "optimizer_states": m["optimizer_states"].bytes + m["master_weights"].bytes + counters,
                 "activations": m["activations"].bytes, "peak": seen + rng}
    if guard is not None:
        guard(predicted["peak"])
    report, reading = _refusals(model.model_type, lambda: record_slice(
        part, model.model_type, traced_setup(setup), model.num_layers, fake=fake, allocator=True))
    traced = {"weights": report.terms["parameters"], "gradients": report.terms["gradients"],
              "optimizer_states": report.terms["optimizer_states"],
              "activations": report.terms["activations"], "peak": report.peak_bytes}
    return Comparison(predicted, traced, plan.peak_phase, report.peak_phase, {}, dict(report.phase_peaks),
                      reading, seen, m["peak"].formula), model
