"""Each family's modules and parameters, named exactly as transformers 5 names them.

Counting from named shapes rather than a closed formula is what lets one layout serve every use:
total parameters, PEFT's target matching (which works on module paths), QLoRA's choice of layers
to quantise, optimizer states that depend on tensor shapes, and safetensors headers that depend on
tensor names. Tests build the same models on the meta device and compare name by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property, lru_cache

from .spec import ModelSpec

# Module kinds. `linear` and `conv1d` are what PEFT's LoRA wraps as linear layers; GPT-2's Conv1D
# stores its weight transposed, as (in_features, out_features).
LINEAR_KINDS = ("linear", "conv1d")
# Families whose fused experts store each expert's weight as (in, out), with the router at
# `mlp.router` (GPT-OSS; Llama 4's `feed_forward.router`)
TRANSPOSED_EXPERTS = ("gpt_oss", "llama4")


@dataclass(frozen=True)
class Param:
    """One parameter tensor: its name as `named_parameters` gives it, and its shape."""

    name: str
    shape: tuple[int, ...]

    @cached_property  # frozen values: computed once (cached_property writes the instance's __dict__)
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class Module:
    """A module that owns parameters (a leaf in `named_modules`).

    A tied output head owns none: its weight is the input embedding's, so `params` is empty while
    `in_features`/`out_features` still give the shape LoRA would wrap.
    """

    path: str
    # linear | conv1d | embedding | norm | router | experts | sinks | conv (a depthwise nn.Conv1d) |
    # decay (a gated-DeltaNet's own A_log and dt_bias)
    kind: str
    params: tuple[Param, ...]
    in_features: int = 0
    out_features: int = 0

    @cached_property
    def numel(self) -> int:
        return sum(p.numel for p in self.params)

    @cached_property
    def bias(self) -> Param | None:
        return next((p for p in self.params if p.name.endswith(".bias")), None)


@dataclass(frozen=True)
class Architecture:
    """A model's parameter-owning modules in order, and which module is the output head."""

    modules: tuple[Module, ...]
    head_path: str  # the output head: lm_head, or score for a sequence classifier
    tied_head: bool

    @cached_property
    def params(self) -> tuple[Param, ...]:
        return tuple(p for m in self.modules for p in m.params)

    @cached_property
    def total_params(self) -> int:
        return sum(m.numel for m in self.modules)

    @cached_property
    def experts(self) -> dict[str, Module]:
        """The fused expert modules by path (Mixtral's `...mlp.experts`), found once."""
        return {m.path: m for m in self.modules if m.kind == "experts"}

    @cached_property
    def container_paths(self) -> tuple[str, ...]:
        """Every module path that is not a leaf (`model.layers.0.mlp`, `model`, ...)."""
        leaves = {m.path for m in self.modules}
        seen: dict[str, None] = {}
        for m in self.modules:
            parts = m.path.split(".")
            for i in range(1, len(parts)):
                prefix = ".".join(parts[:i])
                if prefix not in leaves:
                    seen[prefix] = None
        return tuple(seen)


def _linear(path: str, in_f: int, out_f: int, bias: bool) -> Module:
    params = [Param(f"{path}.weight", (out_f, in_f))]  # nn.Linear: (out, in)
    if bias:
        params.append(Param(f"{path}.bias", (out_f,)))
    return Module(path, "linear", tuple(params), in_f, out_f)


def _conv1d(path: str, in_f: int, out_f: int) -> Module:
    # GPT-2's Conv1D keeps weight as (in, out) and always has a bias.
    params = (Param(f"{path}.weight", (in_f, out_f)), Param(f"{path}.bias", (out_f,)))
    return Module(path, "conv1d", params, in_f, out_f)


def _embedding(path: str, num: int, dim: int) -> Module:
    return Module(path, "embedding", (Param(f"{path}.weight", (num, dim)),), num, dim)


def _norm(path: str, dim: int, bias: bool) -> Module:
    params = [Param(f"{path}.weight", (dim,))]
    if bias:
        params.append(Param(f"{path}.bias", (dim,)))
    return Module(path, "norm", tuple(params))


def _head(path: str, hidden: int, out: int, tied: bool) -> Module:
    if tied:
        return Module(path, "linear", (), hidden, out)
    return _linear(path, hidden, out, bias=False)


def _gpt2_layers(spec: ModelSpec) -> list[Module]:
    h, inner = spec.hidden_size, spec.intermediate_size
    modules = [
        _embedding("transformer.wte", spec.vocab_size, h),
        _embedding("transformer.wpe", spec.max_positions, h),
    ]
    for i in range(spec.num_layers):
        p = f"transformer.h.{i}"
        modules += [
            _norm(f"{p}.ln_1", h, bias=True),
            _conv1d(f"{p}.attn.c_attn", h, 3 * h),  # fused q, k, v
            _conv1d(f"{p}.attn.c_proj", h, h),
            _norm(f"{p}.ln_2", h, bias=True),
            _conv1d(f"{p}.mlp.c_fc", h, inner),
            _conv1d(f"{p}.mlp.c_proj", inner, h),
        ]
    modules.append(_norm("transformer.ln_f", h, bias=True))
    return modules


def _latent_attention(spec: ModelSpec, p: str) -> list[Module]:
    """DeepSeek-V3's multi-head latent attention: queries projected directly (`q_proj`) or through a
    normed bottleneck (`q_a_proj`, `q_a_layernorm`, `q_b_proj`); one compressed key/value latent and
    the shared rotary key (`kv_a_proj_with_mqa`), normed (`kv_a_layernorm`) and expanded to every
    head's key and value (`kv_b_proj`). `attention_bias` puts a bias on q_a, kv_a and o only."""
    h, nh, b = spec.hidden_size, spec.num_heads, spec.qkv_bias
    q_out = nh * spec.head_dim
    nope = spec.head_dim - spec.rotary_dim
    a = f"{p}.self_attn"
    if spec.q_lora_rank:
        query = [_linear(f"{a}.q_a_proj", h, spec.q_lora_rank, b),
                 _norm(f"{a}.q_a_layernorm", spec.q_lora_rank, bias=False),
                 _linear(f"{a}.q_b_proj", spec.q_lora_rank, q_out, False)]
    else:
        query = [_linear(f"{a}.q_proj", h, q_out, False)]
    return [
        *query,
        _linear(f"{a}.kv_a_proj_with_mqa", h, spec.kv_lora_rank + spec.rotary_dim, b),
        _norm(f"{a}.kv_a_layernorm", spec.kv_lora_rank, bias=False),
        _linear(f"{a}.kv_b_proj", spec.kv_lora_rank, nh * (nope + spec.value_head_dim), False),
        _linear(f"{a}.o_proj", nh * spec.value_head_dim, h, spec.out_bias),
    ]


def _gated_delta_net(spec: ModelSpec, p: str) -> list[Module]:
    """Qwen3-Next's linear attention (`Qwen3NextGatedDeltaNet`): q, k, v and the output gate z in one
    projection (`in_proj_qkvz`), beta and a in another (`in_proj_ba`, one of each per value head), a
    depthwise causal convolution over q, k and v (`conv1d`, no bias: weight (channels, 1, kernel)),
    the decay's per-value-head `A_log` and `dt_bias` (parameters of the module itself), a gated
    RMSNorm over each value head (`norm`) and `out_proj`; no biases."""
    h, a = spec.hidden_size, f"{p}.linear_attn"
    keys = spec.linear_key_heads * spec.linear_key_head_dim
    values = spec.linear_value_heads * spec.linear_value_head_dim
    channels = 2 * keys + values
    own = (Param(f"{a}.dt_bias", (spec.linear_value_heads,)), Param(f"{a}.A_log", (spec.linear_value_heads,)))
    return [
        Module(a, "decay", own),
        Module(f"{a}.conv1d", "conv", (Param(f"{a}.conv1d.weight", (channels, 1, spec.linear_conv_kernel)),)),
        _linear(f"{a}.in_proj_qkvz", h, 2 * keys + 2 * values, False),
        _linear(f"{a}.in_proj_ba", h, 2 * spec.linear_value_heads, False),
        _norm(f"{a}.norm", spec.linear_value_head_dim, bias=False),
        _linear(f"{a}.out_proj", values, h, False),
    ]


def _attention(spec: ModelSpec, p: str) -> list[Module]:
    if spec.kv_lora_rank:
        return _latent_attention(spec, p)
    h = spec.hidden_size
    # (an output gate: q_proj makes each head's query and its gate)
    q_out = spec.num_heads * spec.head_dim * (2 if spec.attention_output_gate else 1)
    kv_out = spec.num_kv_heads * spec.head_dim  # grouped-query attention: fewer k/v heads
    if spec.family == "phi3":
        return [
            _linear(f"{p}.self_attn.qkv_proj", h, q_out + 2 * kv_out, spec.qkv_bias),
            _linear(f"{p}.self_attn.o_proj", q_out, h, spec.out_bias),
        ]
    modules = [
        _linear(f"{p}.self_attn.q_proj", h, q_out, spec.qkv_bias),
        _linear(f"{p}.self_attn.k_proj", h, kv_out, spec.qkv_bias),
        _linear(f"{p}.self_attn.v_proj", h, kv_out, spec.qkv_bias),
        _linear(f"{p}.self_attn.o_proj", spec.num_heads * spec.head_dim, h, spec.out_bias),
    ]
    if spec.qk_norm and spec.qk_norm != "l2":  # (Llama 4's weightless norm owns no parameter)
        # Qwen3 normalises each head (a weight of head_dim), OLMo 2 the whole projection
        per_head = spec.qk_norm == "head"
        modules += [
            _norm(f"{p}.self_attn.q_norm", spec.head_dim if per_head else spec.num_heads * spec.head_dim,
                  bias=False),
            _norm(f"{p}.self_attn.k_norm", spec.head_dim if per_head else kv_out, bias=False),
        ]
    return modules


def _gated_mlp(path: str, h: int, inner: int, b: bool) -> list[Module]:
    return [
        _linear(f"{path}.gate_proj", h, inner, b),
        _linear(f"{path}.up_proj", h, inner, b),
        _linear(f"{path}.down_proj", inner, h, b),
    ]


def _mlp(spec: ModelSpec, p: str, i: int) -> list[Module]:
    h, inner, b = spec.hidden_size, spec.mlp_width(i), spec.mlp_bias
    mlp = f"{p}.{spec.mlp_module}"
    if spec.family == "phi3":
        return [
            _linear(f"{p}.mlp.gate_up_proj", h, 2 * inner, b),  # fused gate and up
            _linear(f"{p}.mlp.down_proj", inner, h, b),
        ]
    if spec.sparse_layer(i):
        sparse = _experts(spec, p)
        # DeepSeek-V3's shared experts: one gated MLP as wide as `shared_experts` experts (Qwen3-Next's
        # `shared_expert`, of its own width, and its gate)
        if spec.shared_experts:
            sparse += _gated_mlp(shared_expert_path(spec, p), h, spec.shared_width, b)
        if spec.shared_expert_gate:
            sparse.append(_linear(f"{mlp}.shared_expert_gate", h, 1, False))
        return sparse
    return _gated_mlp(mlp, h, inner, b)


def shared_expert_path(spec: ModelSpec, p: str) -> str:
    """The shared expert MLP of layer prefix `p`: `mlp.shared_experts` (DeepSeek-V3, GLM-4-MoE),
    `mlp.shared_expert` where a sigmoid gate scales it (Qwen3-Next), `feed_forward.shared_expert`
    (Llama 4): `ModelSpec.mlp_module` and `ModelSpec.shared_module`."""
    return f"{p}.{spec.mlp_module}.{spec.shared_module}"


def router_path(spec: ModelSpec, p: str) -> str:
    """The router module of layer prefix `p`: `mlp.gate` (Mixtral, Qwen3-MoE), `mlp.router` (GPT-OSS),
    `feed_forward.router` (Llama 4)."""
    return f"{p}.{spec.mlp_module}.{'router' if spec.family in TRANSPOSED_EXPERTS else 'gate'}"


def _experts(spec: ModelSpec, p: str) -> list[Module]:
    """transformers 5 stores all experts of a layer as two 3-D parameters and the router as a plain
    weight: none of them is an nn.Linear, so PEFT's target_modules cannot wrap them. Mixtral and
    Qwen3-MoE store each expert's weight as (out, in); GPT-OSS as (in, out), gate and up interleaved
    in one (hidden, 2 x inner), with a bias per expert output and a router bias (`mlp_bias`); Llama 4
    as GPT-OSS without biases, gate and up as halves, its router an nn.Linear subclass
    (`Llama4Router`) that target_modules would reach (`counts` refuses it: its forward breaks)."""
    h, inner, e = spec.hidden_size, spec.intermediate_size, spec.num_experts
    router, experts = router_path(spec, p), f"{p}.{spec.mlp_module}.experts"
    transposed = spec.family in TRANSPOSED_EXPERTS
    router_params = [Param(f"{router}.weight", (e, h))]
    expert_params = [
        Param(f"{experts}.gate_up_proj", (e, h, 2 * inner) if transposed else (e, 2 * inner, h)),
        Param(f"{experts}.down_proj", (e, inner, h) if transposed else (e, h, inner)),
    ]
    if spec.mlp_bias:
        router_params.append(Param(f"{router}.bias", (e,)))
        expert_params[1:1] = [Param(f"{experts}.gate_up_proj_bias", (e, 2 * inner))]
        expert_params.append(Param(f"{experts}.down_proj_bias", (e, h)))
    return [Module(router, "router", tuple(router_params)),
            Module(experts, "experts", tuple(expert_params))]


def _decoder_layers(spec: ModelSpec) -> list[Module]:
    h = spec.hidden_size
    modules = [_embedding("model.embed_tokens", spec.vocab_size, h)]
    for i in range(spec.num_layers):
        p = f"model.layers.{i}"
        if spec.attention_sinks:  # a parameter of the attention module itself, one logit per head
            modules.append(Module(f"{p}.self_attn", "sinks",
                                  (Param(f"{p}.self_attn.sinks", (spec.num_heads,)),)))
        modules += _gated_delta_net(spec, p) if spec.linear_layer(i) else _attention(spec, p)
        modules += _mlp(spec, p, i)
        if spec.norm_placement != "post":  # OLMo 2 has no norm before attention
            modules.append(_norm(f"{p}.input_layernorm", h, bias=False))
        # before the MLP (Llama), after attention (Gemma-2, OLMo 2): the same name
        modules.append(_norm(f"{p}.post_attention_layernorm", h, bias=False))
        if spec.norm_placement == "sandwich":  # Gemma-2 normalises around the MLP too
            modules.append(_norm(f"{p}.pre_feedforward_layernorm", h, bias=False))
        if spec.norm_placement in ("sandwich", "post"):
            modules.append(_norm(f"{p}.post_feedforward_layernorm", h, bias=False))
    modules.append(_norm("model.norm", h, bias=False))
    return modules


def layout(spec: ModelSpec, task: str = "causal-lm", num_labels: int = 2) -> Architecture:
    """The model's parameter-owning modules, for a causal LM or a sequence classifier.

    A causal LM ends in `lm_head` (tied to the input embedding where the config says so); a
    sequence classifier (`AutoModelForSequenceClassification`) ends in `score`, a bias-free linear
    layer of `num_labels` outputs that is never tied.
    """
    # one cache entry however the defaults are spelt: `layout(spec)` is `layout(spec, "causal-lm", 2)`
    return _layout(spec, task, num_labels)


@lru_cache(maxsize=64)
def _layout(spec: ModelSpec, task: str, num_labels: int) -> Architecture:
    body = _gpt2_layers(spec) if spec.family == "gpt2" else _decoder_layers(spec)
    if task == "seq-cls":
        head = _linear("score", spec.hidden_size, num_labels, bias=False)
        return Architecture(tuple(body) + (head,), "score", tied_head=False)
    head = _head("lm_head", spec.hidden_size, spec.vocab_size, spec.tied_embeddings)
    return Architecture(tuple(body) + (head,), "lm_head", tied_head=spec.tied_embeddings)


def kept_in_fp32(spec: ModelSpec, arch: Architecture) -> tuple[Param, ...]:
    """Parameters transformers keeps in fp32 whatever dtype the model is loaded in
    (`_keep_in_fp32_modules_strict`): DeepSeek-V3's router weights (`mlp.gate.weight`), which its
    sigmoid router reads in fp32. Empty for every other family."""
    if spec.routing != "sigmoid-group-topk":
        return ()
    return tuple(p for m in arch.modules if m.kind == "router" for p in m.params)
