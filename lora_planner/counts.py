"""Parameter counts: the model's total, and what LoRA makes trainable.

The trainable count equals what PEFT 0.21's `get_nb_trainable_parameters()` reports for the same
`LoraConfig`; tests apply PEFT to meta-device models and compare to the parameter. That means
following PEFT's rules rather than inventing cleaner ones:

- A target name matches a module path that equals it or ends with `.` + name; a `re:` target is a
  regular expression that must match the whole path.
- `all-linear` takes every `nn.Linear`/`Conv1D` except the output head (`lm_head`, or the `score`
  head of a classifier).
- Modules named in `modules_to_save` are never LoRA-wrapped; they are copied and trained in full.
  A sequence classifier always saves `classifier` and `score`.
- `bias="all"` trains every parameter named `bias` (not GPT-OSS's expert `gate_up_proj_bias` and
  `down_proj_bias`, whose names do not end in `.bias`); `bias="lora_only"` trains the
  biases of the wrapped layers.
- Mixtral on transformers 5 (fused experts): PEFT maps the v4 names to parameter targets. `w1` and
  `w3` (always together) become `experts.gate_up_proj` at rank 2r, `w2` becomes
  `experts.down_proj`, `gate` becomes the router weight; `all-linear` takes all three. A 3-D
  parameter of E experts gets A = (r*E, in) and B = (out, r*E). Qwen3-MoE the same, its v4 names
  `gate_proj` and `up_proj` (together) and `down_proj`; DeepSeek-V3 and GLM-4-MoE too, whose dense
  MLPs and shared experts are nn.Linear layers under those same names, which PEFT therefore never
  wraps (the names reach the fused experts only, `all-linear` included).
- GPT-OSS (fused experts with biases, PEFT has no v4 names for it): its expert parameters are
  targeted by their own names, `gate_up_proj` and `down_proj`, and its router by `router`, as PEFT's
  `target_parameters` reaches them; the gate/up tensor at rank r (no conversion doubles it), and
  `all-linear` takes the attention's linear layers only (PEFT's `all-linear` is nn.Linear only).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from .architecture import LINEAR_KINDS, Architecture, Module, Param, layout
from .errors import PlanError
from .spec import LINEAR_ATTENTION_FAMILIES, ModelSpec, TrainSetup

# PEFT's TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING, for our families. PEFT has no entry
# for phi3 (it asks for explicit targets); we use the fused attention layer, as its `qv` preset.
PEFT_DEFAULT_TARGETS = {
    "gpt2": ("c_attn",),
    "llama": ("q_proj", "v_proj"),
    "mistral": ("q_proj", "v_proj"),
    "mixtral": ("q_proj", "v_proj"),
    "qwen2": ("q_proj", "v_proj"),
    "gemma2": ("q_proj", "v_proj"),
    "phi3": ("qkv_proj",),
    "qwen3": ("q_proj", "v_proj"),
    "qwen3_moe": ("q_proj", "v_proj"),  # PEFT has no entry; as for Mixtral
    "olmo2": ("q_proj", "v_proj"),  # PEFT has no entry; as for Llama
    "smollm3": ("q_proj", "v_proj"),  # PEFT has no entry; as for Llama
    "gemma3": ("q_proj", "v_proj"),  # PEFT's gemma3_text entry
    "gpt_oss": ("q_proj", "v_proj"),  # PEFT has no entry; as for Llama
    # PEFT has no entry; latent attention has no v_proj: its `qv` preset (`latent_attention_targets`)
    "deepseek_v3": (),
    "glm4_moe": ("q_proj", "v_proj"),  # PEFT has no entry; as for Llama
    # PEFT has no entry: its `qv` preset, the full-attention layers' q and v and the linear-attention
    # layers' fused q/k/v/z projection (LoRA cannot wrap part of it)
    "qwen3_next": ("q_proj", "v_proj", "in_proj_qkvz"),
    "llama4": ("q_proj", "v_proj"),  # PEFT's llama4 entry (its llama4_text, the causal LM's, has none)
}

_SPLIT_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_GATED_MLP = ("gate_proj", "up_proj", "down_proj")
# Presets per family. GPT-2 and Phi-3 fuse q, k and v into one layer, so `qv` there means the
# fused layer: LoRA cannot wrap half of a linear layer.
PRESETS = {
    # Qwen3-Next: the full-attention layers' projections and the linear-attention layers' own
    # (q/k/v/z, beta and a, out_proj)
    "qv": {"gpt2": ("c_attn",), "phi3": ("qkv_proj",), "qwen3_next": ("q_proj", "v_proj", "in_proj_qkvz"),
           "*": ("q_proj", "v_proj")},
    "attn": {"gpt2": ("c_attn", "attn.c_proj"), "phi3": ("qkv_proj", "o_proj"),
             "qwen3_next": (*_SPLIT_ATTN, "in_proj_qkvz", "in_proj_ba", "out_proj"), "*": _SPLIT_ATTN},
    "mlp": {
        "gpt2": ("c_fc", "mlp.c_proj"),
        "phi3": ("gate_up_proj", "down_proj"),
        "mixtral": ("w1", "w2", "w3"),  # Qwen3-MoE's v4 names are the common gate/up/down
        "gpt_oss": ("gate_up_proj", "down_proj"),  # its fused expert parameters
        "*": _GATED_MLP,
    },
}
PRESET_NAMES = ("default", *PRESETS, "all-linear")


def latent_attention_targets(spec: ModelSpec, preset: str) -> tuple[str, ...]:
    """`qv` and `attn` for multi-head latent attention, which has no per-head q/k/v layers: `qv` the
    query's projections (q_proj, or q_a_proj and q_b_proj through the bottleneck) and kv_b_proj, the
    one layer that makes the values (with the keys' unrotated part: LoRA cannot wrap half of it);
    `attn` those with kv_a_proj_with_mqa (the compressed latent and the rotary key) and o_proj."""
    query = ("q_a_proj", "q_b_proj") if spec.q_lora_rank else ("q_proj",)
    if preset == "qv":
        return (*query, "kv_b_proj")
    return (*query, "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")

SEQ_CLS_MODULES_TO_SAVE = ("classifier", "score")
BIAS_MODES = ("none", "all", "lora_only")


@dataclass(frozen=True)
class Adapter:
    """The LoRA tensors added to one wrapped module, named as PEFT saves them."""

    module: Module
    params: tuple[Param, ...]

    @functools.cached_property  # a frozen value: computed once
    def numel(self) -> int:
        return sum(p.numel for p in self.params)


@dataclass(frozen=True)
class Trainable:
    """Everything a LoRA setup trains, tensor by tensor (for optimizer states and checkpoints)."""

    adapters: tuple[Adapter, ...]
    biases: tuple[Param, ...]
    saved_modules: tuple[Module, ...]  # modules_to_save: trained copies of whole modules
    target_names: tuple[str, ...]  # the resolved target list, as it would go into LoraConfig
    gate_up_factor: int = 2  # a fused gate/up tensor's rank over r (`gate_up_rank_factor`)

    @functools.cached_property
    def params(self) -> tuple[Param, ...]:
        copies = tuple(p for m in self.saved_modules for p in m.params)
        return tuple(p for a in self.adapters for p in a.params) + self.biases + copies

    @functools.cached_property
    def count(self) -> int:
        return sum(p.numel for p in self.params)

    @functools.cached_property
    def file_params(self) -> tuple[Param, ...]:
        """The tensors of PEFT's adapter file, under its names: `base_model.model.` + the path,
        with the bias of a wrapped layer under `base_layer.bias` (the wrapper holds the layer)."""
        wrapped = {a.module.path for a in self.adapters}

        def saved_name(p: Param) -> Param:
            path, leaf = p.name.rsplit(".", 1)
            name = f"{path}.base_layer.{leaf}" if path in wrapped else p.name
            return Param(f"base_model.model.{name}", p.shape)

        adapters = tuple(Param(f"base_model.model.{p.name}", p.shape)
                         for a in self.adapters for p in a.params)
        copies = tuple(Param(f"base_model.model.{p.name}", p.shape)
                       for m in self.saved_modules for p in m.params)
        return adapters + tuple(saved_name(p) for p in self.biases) + copies

    @functools.cached_property
    def adapter_count(self) -> int:
        return sum(a.numel for a in self.adapters)

    @functools.cached_property
    def formula(self) -> str:
        """How `count` is made, one clause per kind of wrapped module (in the order first met):
        a linear layer or router r x (in + out), an embedding r x (rows + dim), a fused expert
        tensor of E experts r x E x (in + out) (2r on gate_up, which fuses two projections),
        DoRA's one magnitude per output, then trained biases and modules_to_save copies."""
        kinds: dict[str, int] = {}
        for a in self.adapters:
            kind = a.module.kind
            if kind == "experts":
                kind = "gate_up" if a.module.path.endswith("gate_up_proj") else "experts"
            kinds[kind] = kinds.get(kind, 0) + 1
        described = {
            "embedding": "embeddings, r x (rows + dim) each",
            "router": "routers, r x (in + out) each",
            "gate_up": f"fused expert gate_up tensors, {'2r' if self.gate_up_factor == 2 else 'r'} x E x "
                       "(in + out) each",
            "experts": "fused expert down tensors, r x E x (in + out) each",
        }
        clauses = [f"{n} {described.get(k, 'linear layers, r x (in + out) each')}"
                   for k, n in kinds.items()]
        if any(p.name.endswith("lora_magnitude_vector") for a in self.adapters for p in a.params):
            clauses.append("DoRA: one magnitude per output feature")
        if self.biases:
            clauses.append(f"{len(self.biases)} trained biases")
        if self.saved_modules:
            clauses.append(f"{len(self.saved_modules)} modules_to_save copies")
        return "; ".join(clauses)

    @functools.cached_property
    def saved_module_count(self) -> int:
        return sum(m.numel for m in self.saved_modules)


def total_params(spec: ModelSpec, task: str = "causal-lm", num_labels: int = 2) -> int:
    """Every parameter of the model, a tied output head counted once.

    Equals `sum(p.numel() for p in model.parameters())` of the transformers model; buffers such as
    rotary frequencies are not parameters and are not counted.
    """
    return layout(spec, task, num_labels).total_params


def lora_linear_params(in_features: int, out_features: int, rank: int) -> int:
    """LoRA on a linear layer: A is (r, in) and B is (out, r), so r * (in + out) parameters.

    For a square d x d matrix that is 2 * d * r (d=768, r=8 gives 12,288).
    """
    return rank * (in_features + out_features)


def default_targets(spec: ModelSpec) -> tuple[str, ...]:
    if spec.kv_lora_rank:
        return latent_attention_targets(spec, "qv")
    return _present(spec, PEFT_DEFAULT_TARGETS[spec.family])


def _present(spec: ModelSpec, names: tuple[str, ...]) -> tuple[str, ...]:
    """A preset's names some module of a mixed-layer model has: Qwen3-Next's layers may all be of
    one kind (no full or no linear attention), and PEFT wraps whatever a list's names reach. Every
    name, when none is present (the error then names them)."""
    if spec.family not in LINEAR_ATTENTION_FAMILIES:
        return names
    paths = [m.path for m in layout(spec).modules]
    v4_names = MOE_V4_NAMES.get(spec.family, {})
    return tuple(n for n in names if n in v4_names or any(_matches(q, n) for q in paths)) or names


def expand_targets(spec: ModelSpec, targets: tuple[str, ...]) -> tuple[str, ...]:
    """Turn presets into module names; `all-linear` stays as PEFT's own shorthand."""
    names: list[str] = []
    for target in targets:
        if target == "default":
            names += default_targets(spec)
        elif target in ("qv", "attn") and spec.kv_lora_rank:
            names += latent_attention_targets(spec, target)
        elif target in PRESETS:
            by_family = PRESETS[target]
            chosen = by_family.get(spec.family, by_family["*"])
            names += _present(spec, chosen)
        else:
            names.append(target)
    return tuple(dict.fromkeys(names))


def _matches(path: str, target: str) -> bool:
    if target.startswith("re:"):
        return re.fullmatch(target[3:], path) is not None
    return path == target or path.endswith("." + target)


def _saved_by(path: str, modules_to_save: tuple[str, ...]) -> bool:
    # PEFT never wraps a module inside one that modules_to_save copies.
    return any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", path) for m in modules_to_save)


def _wrappable_names(arch: Architecture) -> list[str]:
    names = {m.path.rsplit(".", 1)[-1] for m in arch.modules if m.kind in LINEAR_KINDS}
    return sorted(names)


def _check_targets(arch: Architecture, targets: tuple[str, ...]) -> None:
    for target in targets:
        if target.startswith("re:"):
            try:
                re.compile(target[3:])
            except re.error as exc:
                raise PlanError(f"target {target!r} is not a valid regular expression: {exc}") from None


# Families whose router is an nn.Linear subclass returning (scores, logits) (Llama 4's `Llama4Router`):
# target_modules (all-linear too) wrap it as a LoRA linear layer, whose forward then adds the adapter's
# output to that tuple and fails, so a target reaching it is refused
LINEAR_ROUTERS = ("llama4",)


def _check_linear_router(spec: ModelSpec, arch: Architecture, targets: tuple[str, ...]) -> None:
    if spec.family not in LINEAR_ROUTERS:
        return
    routers = [m.path for m in arch.modules if m.kind == "router"]
    if "all-linear" in targets or any(_matches(r, t) for r in routers for t in targets):
        raise PlanError(f"PEFT would wrap {spec.family}'s router (an nn.Linear returning scores and logits) "
                        "as a LoRA linear layer, whose forward fails: name the targets instead of "
                        "all-linear (e.g. q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj)")


def wrapped_modules(spec: ModelSpec, setup: TrainSetup) -> tuple[tuple[Module, ...], tuple[str, ...]]:
    """The modules LoRA wraps for the setup's targets, and the resolved target names."""
    arch = layout(spec, setup.task, setup.num_labels)
    targets = expand_targets(spec, setup.targets)
    _check_targets(arch, targets)
    _check_linear_router(spec, arch, targets)
    saved = _modules_to_save_names(setup)
    v4_names = MOE_V4_NAMES.get(spec.family, {})
    if v4_names and spec.family in PEFT_CONVERTED:
        targets = tuple(dict.fromkeys(name for t in targets for name in (
            regex_target_names(arch, t[3:], v4_names) if t.startswith("re:") else (t,))))
    moe = _moe_targets(arch, targets, v4_names, spec.family in PEFT_CONVERTED) if v4_names else []
    targets_left = tuple(t for t in targets if not any(_matches(f"x.{n}", t) for n in v4_names))
    if moe and not targets_left:
        return tuple(moe), targets
    if "all-linear" in targets:
        others = tuple(t for t in targets_left if t != "all-linear")
        # PEFT resolves all-linear to the linear layers' names, then hands the v4 expert names on to
        # the fused experts: a linear layer under one of those names (DeepSeek-V3's dense MLPs and
        # shared experts) is left unwrapped
        chosen = [
            m for m in arch.modules
            if (m.kind in LINEAR_KINDS and m.path != arch.head_path
                and m.path.rsplit(".", 1)[-1] not in v4_names)
            or any(_matches(m.path, t) for t in others)
        ]
    else:
        chosen = [m for m in arch.modules if any(_matches(m.path, t) for t in targets_left)
                  and m.kind not in ("router", "experts")]
        unmatched = [t for t in targets_left if not any(_matches(m.path, t) for m in arch.modules)]
        containers = [p for p in arch.container_paths if any(_matches(p, t) for t in targets_left)]
        if containers:
            raise PlanError(
                f"target matches {containers[0]}, which is not a linear or embedding layer; "
                f"LoRA can wrap: {', '.join(_wrappable_names(arch))}"
            )
        if unmatched:
            raise PlanError(
                f"target {', '.join(map(repr, unmatched))} matches no module of {spec.name}; "
                f"linear layers are: {', '.join(_wrappable_names(arch))}; "
                f"presets: {', '.join(PRESET_NAMES)}"
            )
    chosen = [m for m in chosen if not _saved_by(m.path, saved)]
    for m in chosen:
        if m.kind not in (*LINEAR_KINDS, "embedding"):
            raise PlanError(
                f"target matches {m.path}, a {m.kind} module that LoRA cannot wrap; "
                f"LoRA can wrap: {', '.join(_wrappable_names(arch))}"
            )
    chosen += moe
    if not chosen:
        raise PlanError(f"the targets {', '.join(targets)} leave no module of {spec.name} to wrap")
    return tuple(chosen), targets


# The names that reach a family's router and fused expert parameters, each -> what it reaches. For
# Mixtral and Qwen3-MoE these are PEFT's v4 -> v5 names (`_MOE_TARGET_MODULE_MAPPING`): the v4 expert
# linears live inside fused 3-D parameters now, the router is a plain weight. GPT-OSS's are its
# parameters' own names (PEFT's `target_parameters`).
MOE_V4_NAMES = {
    "mixtral": {"w1": "gate_up_proj", "w3": "gate_up_proj", "w2": "down_proj", "gate": "router"},
    "qwen3_moe": {"gate_proj": "gate_up_proj", "up_proj": "gate_up_proj", "down_proj": "down_proj",
                  "gate": "router"},
    "gpt_oss": {"gate_up_proj": "gate_up_proj", "down_proj": "down_proj", "router": "router"},
    # DeepSeek-V3 (PEFT maps it as Qwen2-MoE): its dense MLPs' and shared experts' gate_proj, up_proj
    # and down_proj are nn.Linear layers, but these names reach only the fused experts
    "deepseek_v3": {"gate_proj": "gate_up_proj", "up_proj": "gate_up_proj", "down_proj": "down_proj",
                    "gate": "router"},
    "glm4_moe": {"gate_proj": "gate_up_proj", "up_proj": "gate_up_proj", "down_proj": "down_proj",
                 "gate": "router"},
    # (PEFT converts it as Qwen2-MoE: its shared expert's and dense MLPs' linears stay unwrapped)
    "qwen3_next": {"gate_proj": "gate_up_proj", "up_proj": "gate_up_proj", "down_proj": "down_proj",
                   "gate": "router"},
}
# Families whose names PEFT converts (`_convert_peft_config_moe`): two v4 linears fuse into gate_up_proj
# at rank and alpha 2r, and `all-linear` reaches the experts and the router
PEFT_CONVERTED = ("mixtral", "qwen3_moe", "deepseek_v3", "glm4_moe", "qwen3_next")


def regex_target_names(arch: Architecture, pattern: str, v4_names: dict[str, str]) -> tuple[str, ...]:
    """A regex target on a model whose experts PEFT converts from v4 names, as PEFT 0.21 reads it
    (`_resolve_string_target_modules`): the last names of the module paths and parameter names it
    matches in full, and a v4 expert name where the regex matches it under a fused expert's module
    (`...mlp.experts.gate_proj`). Each is then a plain name, matched in every layer, and a v4 name
    reaches the fused experts: a regex cannot single out one layer, nor a dense or shared MLP."""
    from .validate import regex

    compiled = regex("target", pattern)
    keys = [*(m.path for m in arch.modules), *arch.container_paths, *(p.name for p in arch.params)]
    matched = {k.rsplit(".", 1)[-1] for k in keys if compiled.fullmatch(k)}
    holders: dict[str, set[str]] = {}
    for p in arch.params:
        holder, _, leaf = p.name.rpartition(".")
        holders.setdefault(leaf, set()).add(holder)
    for old, new in v4_names.items():
        if old not in matched and any(compiled.fullmatch(f"{h}.{old}") for h in holders.get(new, ())):
            matched.add(old)
    if not matched:
        raise PlanError(f"target 're:{pattern}' matches no module of the model")
    return tuple(sorted(matched))


def gate_up_rank_factor(spec: ModelSpec) -> int:
    """A fused gate/up expert tensor's LoRA rank over r: 2 where PEFT converts two v4 linears into it
    (Mixtral, Qwen3-MoE), 1 where it is targeted by its own name (GPT-OSS)."""
    return 2 if spec.family in PEFT_CONVERTED else 1


def _moe_targets(arch: Architecture, targets: tuple[str, ...], v4_names: dict[str, str],
                 converted: bool) -> list[Module]:
    """The router and expert parameters PEFT targets for the family's names, as pseudo-modules
    holding just the targeted parameter (`kind` router or experts; a router's weight, not its bias).
    `converted`: PEFT's v4 conversion, under which `all-linear` reaches them all."""
    everything = converted and "all-linear" in targets
    named = {n for n in v4_names if everything or any(_matches(f"x.{n}", t) for t in targets)}
    reached = {v4_names[n] for n in named}
    fused = sorted(n for n, reach in v4_names.items() if reach == "gate_up_proj")
    if named & set(fused) and not set(fused) <= named:
        raise PlanError(f"{' and '.join(fused)} are fused into experts.gate_up_proj: target both or neither")
    chosen = []
    for m in arch.modules:
        for p in m.params:
            leaf = p.name.rsplit(".", 1)[-1]
            picked = (
                (m.kind == "router" and "router" in reached and leaf == "weight")
                or (m.kind == "experts" and leaf in reached)
            )
            if picked:
                chosen.append(Module(f"{m.path}.{leaf}" if m.kind == "experts" else m.path,
                                     m.kind, (p,)))
    return chosen


def _modules_to_save_names(setup: TrainSetup) -> tuple[str, ...]:
    names = tuple(setup.modules_to_save)
    if setup.task == "seq-cls":
        names += SEQ_CLS_MODULES_TO_SAVE
    return tuple(dict.fromkeys(names))


def adapter_for(module: Module, rank: int, use_dora: bool, gate_up_factor: int = 2) -> Adapter:
    """The tensors PEFT adds to one module, under the names it saves them with.

    Linear and Conv1D: `lora_A.weight` (r, in) and `lora_B.weight` (out, r); DoRA adds
    `lora_magnitude_vector` of one value per output feature. Embedding: `lora_embedding_A`
    (r, num_embeddings) and `lora_embedding_B` (embedding_dim, r).
    """
    p = module.path
    if module.kind in ("router", "experts"):
        return _param_adapter(module, rank, use_dora, gate_up_factor)
    # PEFT wraps a layer at any rank, even above min(in, out) (`oversized_rank_note` says so)
    if module.kind == "embedding":
        if use_dora:
            raise PlanError(f"DoRA on the embedding {p} is not modelled; leave it out of the targets")
        return Adapter(module, (
            Param(f"{p}.lora_embedding_A", (rank, module.in_features)),
            Param(f"{p}.lora_embedding_B", (module.out_features, rank)),
        ))
    params = [
        Param(f"{p}.lora_A.weight", (rank, module.in_features)),
        Param(f"{p}.lora_B.weight", (module.out_features, rank)),
    ]
    if use_dora:
        params.append(Param(f"{p}.lora_magnitude_vector", (module.out_features,)))
    return Adapter(module, tuple(params))


def _param_adapter(module: Module, rank: int, use_dora: bool, gate_up_factor: int) -> Adapter:
    """PEFT's ParamWrapper on a router weight (out, in) or a fused expert weight (E, out, in):
    A = (r*E, in), B = (out, r*E); `gate_up_proj` fusing w1 and w3 has rank 2r (`gate_up_factor`).
    GPT-OSS stores (E, in, out): the count r*E*(in + out) is the same either way."""
    if use_dora:
        raise PlanError("DoRA does not work on fused expert or router parameters (PEFT refuses it)")
    (param,) = module.params
    experts = param.shape[0] if len(param.shape) == 3 else 1
    out_f, in_f = param.shape[-2:]
    r = gate_up_factor * rank if param.name.endswith("gate_up_proj") else rank
    return Adapter(module, (
        Param(f"{module.path}.lora_A.weight", (r * experts, in_f)),
        Param(f"{module.path}.lora_B.weight", (out_f, r * experts)),
    ))


def _shape(module: Module) -> tuple[int, int]:
    """(in, out) of one expert's or one layer's matrix: the LoRA update's size limit."""
    if module.kind in ("router", "experts"):
        out_f, in_f = module.params[0].shape[-2:]
        return in_f, out_f
    return module.in_features, module.out_features


def oversized_rank_note(spec: ModelSpec, setup: TrainSetup) -> str | None:
    """Which wrapped modules the rank exceeds, all at once, or None.

    B @ A of a module with `in` inputs and `out` outputs has rank at most min(in, out), so a LoRA
    rank above it adds parameters (PEFT creates and trains them: A is (r, in), B is (out, r))
    without adding anything the update can express. PEFT accepts such a rank, and so does the plan;
    the note names each kind of module (by its last path element and shape) the rank exceeds.
    A fused gate_up tensor is wrapped at 2r (it holds w1 and w3), so 2r is compared for it.
    """
    if setup.method == "full":
        return None
    over: dict[tuple[str, int, int], None] = {}
    for adapter in lora_trainable(spec, setup).adapters:
        m = adapter.module
        r = gate_up_rank_factor(spec) * setup.rank if m.path.endswith("gate_up_proj") else setup.rank
        in_f, out_f = _shape(m)
        if r > min(in_f, out_f):
            over[(m.path.rsplit(".", 1)[-1], in_f, out_f)] = None
    if not over:
        return None
    named = ", ".join(f"{name} ({in_f} -> {out_f})" for name, in_f, out_f in over)
    return (f"rank {setup.rank} is above the size of {named}: PEFT wraps them at that rank, but the "
            "update B @ A has rank at most min(in, out), so the parameters above it are wasted there")


def unwrapped_mlp_note(spec: ModelSpec, setup: TrainSetup) -> str | None:
    """What MLP layers a LoRA setup naming the MLP leaves frozen, or None. On DeepSeek-V3, GLM-4-MoE
    and Qwen3-MoE with dense layers PEFT 0.21 reads gate_proj, up_proj and down_proj (all-linear and
    a regex too) as the fused routed experts (`MOE_V4_NAMES`), so the dense layers' gated MLPs and the
    shared experts, nn.Linear layers under the same names, are never wrapped."""
    if setup.method == "full" or not (spec.dense_layers or spec.shared_experts):
        return None
    mlp_names = {n for n, reach in MOE_V4_NAMES.get(spec.family, {}).items() if reach != "router"}
    names = lora_trainable(spec, setup).target_names
    if not ("all-linear" in names or any(_matches(f"x.{n}", t) for n in mlp_names for t in names)):
        return None
    dense = sum(1 for i in spec.dense_layers if i < spec.num_layers)
    frozen = " and ".join(part for part in (
        ("the dense layer's MLP" if dense == 1 else f"the {dense} dense layers' MLPs") if dense else "",
        "the shared experts" if spec.shared_experts else "") if part)
    return (f"PEFT 0.21 reads gate_proj, up_proj and down_proj on {spec.family} as the fused routed "
            f"experts: {frozen} stay frozen (no target name or regex reaches them)")


def lora_trainable(spec: ModelSpec, setup: TrainSetup) -> Trainable:
    """What a LoRA (or QLoRA) setup trains: adapters, trainable biases, modules_to_save copies.
    QLoRA trains what LoRA trains (only the frozen base is stored otherwise), so both share one
    answer; so do setups that differ only in how the step runs or is placed (`_STEP_ONLY`), which
    advice and --fit plan again and again."""
    return _lora_trainable(spec, training_key(setup).with_(method="lora"))


def training_key(setup: TrainSetup) -> TrainSetup:
    """`setup` with the fields that cannot change what trains (`_STEP_ONLY`) at their defaults: the
    cache key of an answer that depends on what trains and its dtypes alone."""
    return setup.with_(**_STEP_ONLY)


# TrainSetup fields that cannot change what trains, at their defaults: the cache key leaves them out
_STEP_ONLY = {f: getattr(TrainSetup(), f) for f in (
    "grad_checkpointing", "activation_offload", "optimizer", "optimizer_impl", "batch_size", "seq_len",
    "num_gpus", "sharding", "offload", "compile")}


@functools.lru_cache(maxsize=64)  # a plan asks again for each strategy and the FLOPs; the answer is frozen
def _lora_trainable(spec: ModelSpec, setup: TrainSetup) -> Trainable:
    if setup.rank <= 0:
        raise PlanError(f"rank must be a positive integer, got {setup.rank}")
    if setup.bias not in BIAS_MODES:
        raise PlanError(f"bias must be one of {', '.join(BIAS_MODES)}, got {setup.bias!r}")
    arch = layout(spec, setup.task, setup.num_labels)
    modules, targets = wrapped_modules(spec, setup)
    factor = gate_up_rank_factor(spec)
    adapters = tuple(adapter_for(m, setup.rank, setup.use_dora, factor) for m in modules)
    if setup.lora_dropout and any(m.kind in ("router", "experts") for m in modules):
        raise PlanError("LoRA dropout does not work on fused expert or router parameters (PEFT's "
                        "ParamWrapper refuses it): set it to 0 or leave the router and the experts out")

    saved_names = _modules_to_save_names(setup)
    saved_modules = tuple(
        m for m in arch.modules if any(m.path == n or m.path.endswith("." + n) for n in saved_names)
    )
    unknown = [n for n in setup.modules_to_save if not any(
        m.path == n or m.path.endswith("." + n) for m in arch.modules)]
    if unknown:
        raise PlanError(f"modules_to_save {', '.join(map(repr, unknown))} matches no module of {spec.name}")
    in_saved = {p.name for m in saved_modules for p in m.params}

    if setup.bias == "all":
        biases = tuple(p for p in arch.params if p.name.endswith(".bias") and p.name not in in_saved)
    elif setup.bias == "lora_only":
        biases = tuple(m.bias for m in modules if m.bias is not None)
    else:
        biases = ()
    return Trainable(adapters, biases, saved_modules, targets, factor)
