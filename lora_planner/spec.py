"""What is planned: a model's shape (`ModelSpec`) and how it is trained (`TrainSetup`).

Both are frozen values. The planner turns the pair into a `Plan`; the measurement harness takes the
same `TrainSetup`, so a prediction and its measurement cannot disagree about the settings.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from .errors import PlanError

if TYPE_CHECKING:
    from pathlib import Path

# Dropout of the transformers config classes when a config.json leaves it out (GPT-2: attn_pdrop,
# resid_pdrop and embd_pdrop are 0.1; every other family defaults to 0).
FAMILY_DROPOUT = {"gpt2": 0.1}
# Where a family's modules drop besides inside attention: on both residual branches (GPT-2's block,
# Phi-3's decoder layer), and after the embeddings (GPT-2 alone: Phi-3's `embd_pdrop` is read by no
# module in transformers 5)
RESIDUAL_DROPOUT_FAMILIES = ("gpt2", "phi3")
EMBEDDING_DROPOUT_FAMILIES = ("gpt2",)

FAMILIES = ("gpt2", "llama", "mistral", "mixtral", "qwen2", "gemma2", "phi3", "qwen3", "qwen3_moe", "olmo2",
            "smollm3", "gemma3", "gpt_oss", "deepseek_v3", "glm4_moe", "qwen3_next", "llama4")
# Families whose MLP is a sparse block of fused experts (3-D parameters) and a router (in every layer
# but the `dense_layers`)
MOE_FAMILIES = ("mixtral", "qwen3_moe", "gpt_oss", "deepseek_v3", "glm4_moe", "qwen3_next", "llama4")
# Families whose config names each layer's attention in `layer_types` (sliding or full), read into
# `ModelSpec.global_layers`
LAYER_TYPE_FAMILIES = ("gemma3", "gpt_oss")

# How a sparse block routes and gates (`ModelSpec.routing`, `ModelSpec.expert_gate`):
# "softmax-topk" takes a softmax over every expert's logit, then the top k (Mixtral, Qwen3-MoE);
# "topk-softmax" takes the top k logits, then a softmax over those alone (GPT-OSS);
# "sigmoid-group-topk" takes a sigmoid of fp32 logits, a correction bias added for the choice only,
# the top k within the best `topk_groups` of `expert_groups` groups and the chosen scores scaled by
# `routed_scaling` (DeepSeek-V3's `DeepseekV3TopkRouter`, GLM-4-MoE's);
# "topk-sigmoid" takes the top k logits, scatters them into a row of -inf and takes the sigmoid of
# the whole row in fp32, cast back: every expert gets a score, 0 where not chosen (Llama 4's router)
ROUTINGS = ("softmax-topk", "topk-softmax", "sigmoid-group-topk", "topk-sigmoid")
FAMILY_ROUTING = {"gpt_oss": "topk-softmax", "deepseek_v3": "sigmoid-group-topk",
                  "glm4_moe": "sigmoid-group-topk", "llama4": "topk-sigmoid"}
# "silu": silu(gate) * up over the halves of the fused gate/up output (Mixtral, Qwen3-MoE);
# "clamped-swiglu": GPT-OSS's gate and up interleaved, the gate clamped above at `swiglu_limit` and
# the up on both sides, (up + 1) * gate * sigmoid(alpha * gate)
EXPERT_GATES = ("silu", "clamped-swiglu")
FAMILY_EXPERT_GATE = {"gpt_oss": "clamped-swiglu"}
# How tokens reach the experts: "gathered" sorts each token's k chosen rows to their experts
# (Mixtral, Qwen3-MoE, GPT-OSS, DeepSeek-V3); "every-expert" repeats every token once per expert,
# scaled by its score (0 where not chosen), and runs one bmm over all experts (Llama 4's
# `Llama4TextExperts`): E x tokens rows whatever k is
EXPERT_DISPATCHES = ("gathered", "every-expert")
FAMILY_EXPERT_DISPATCH = {"llama4": "every-expert"}
# The decoder layer's MLP module (`mlp`, Llama 4's `feed_forward`) and its always-on shared expert
# module (`shared_experts`, Llama 4's `shared_expert`)
FAMILY_MLP_MODULE = {"llama4": "feed_forward"}
FAMILY_SHARED_MODULE = {"llama4": "shared_expert"}

# Hugging Face `model_type` values whose layout one of our families reproduces exactly.
MODEL_TYPE_TO_FAMILY = {
    "gpt2": "gpt2",
    "llama": "llama",
    "mistral": "mistral",
    "mixtral": "mixtral",
    "qwen2": "qwen2",
    "gemma2": "gemma2",
    "phi3": "phi3",
    "qwen3": "qwen3",
    "qwen3_moe": "qwen3_moe",
    "olmo2": "olmo2",
    "smollm3": "smollm3",
    "gemma3_text": "gemma3",
    "deepseek_v3": "deepseek_v3",
    "glm4_moe": "glm4_moe",
    "gpt_oss": "gpt_oss",
    "qwen3_next": "qwen3_next",
    "llama4_text": "llama4",
}
# The `model_type` each family's config.json states, where it is not the family's name
FAMILY_MODEL_TYPE = {"gemma3": "gemma3_text", "llama4": "llama4_text"}
# Families of Gemma's form: RMSNorms multiplying by (1 + weight) in fp32 before the cast back, the
# embedding scaled by sqrt(hidden) inside its module, the logits' soft-cap where the config has one
GEMMA_FAMILIES = ("gemma2", "gemma3")
# Families whose RMSNorms multiply by (1 + weight) in fp32 before the cast back (`offset_norms`):
# Gemma's, and Qwen3-Next's (its `Qwen3NextRMSNorm`, weights initialised to 0)
OFFSET_NORM_FAMILIES = (*GEMMA_FAMILIES, "qwen3_next")

# RMSNorm on the projected queries and keys before rope, as each family's attention module has it:
# "head" normalises each head's head_dim values (Qwen3, a weight of head_dim), "full" the whole
# projection (OLMo 2, a weight of heads x head_dim); "l2" each head with no weight, after rope and
# on the rotary layers only (Llama 4's `Llama4TextWeightlessRMSNorm`); None: no such norm.
QK_NORMS = ("head", "full", "l2")
FAMILY_QK_NORM = {"qwen3": "head", "qwen3_moe": "head", "olmo2": "full", "gemma3": "head",
                  "qwen3_next": "head"}
# Families whose config turns a q/k norm on or off (GLM-4-MoE's `use_qk_norm`): the form it has when on
OPTIONAL_QK_NORM = {"glm4_moe": "head", "llama4": "l2"}

# Where a decoder layer's RMSNorms sit: "pre" before attention and before the MLP (Llama's
# input_layernorm and post_attention_layernorm), "sandwich" before and after each (Gemma-2), "post"
# after each block's output only (OLMo 2's post_attention_layernorm and post_feedforward_layernorm).
NORM_PLACEMENTS = ("pre", "sandwich", "post")
FAMILY_NORM_PLACEMENT = {"gemma2": "sandwich", "olmo2": "post", "gemma3": "sandwich"}

# Families whose dense layers are the first ones (`first_k_dense_replace`): their `dense_layers` are
# 0 .. k - 1
FIRST_DENSE = ("deepseek_v3", "glm4_moe")

# Families whose layers mix full attention with gated-DeltaNet linear attention (`layer_types`
# "linear_attention" / "full_attention", read into `ModelSpec.linear_layers`)
LINEAR_ATTENTION_FAMILIES = ("qwen3_next",)
# Families with layers without rotary embeddings (`nope_layers`, read from `no_rope_layers`)
NOPE_FAMILIES = ("smollm3", "llama4")
# Families whose rotary embedding multiplies interleaved pairs as complex numbers in fp32
# (`torch.view_as_complex` times a complex64 `freqs_cis`, Llama 4's `apply_rotary_emb`)
COMPLEX_ROPE = ("llama4",)

# Families whose sliding window is Qwen2's: only with `use_sliding_window`, and only on the layers
# from `max_window_layers` on
QWEN_WINDOWS = ("qwen2", "qwen3")


# Tokens per sequence when none is given: a common fine-tuning length, cut to the model's context.
DEFAULT_SEQ_LEN = 2048


def check_runnable_attention(spec: ModelSpec, attention: str) -> None:
    """A step transformers will run: it builds GPT-OSS (attention sinks) with eager attention only,
    its SDPA path taking no sinks, so a traced or measured GPT-OSS step under sdpa is refused in one
    line (the plan's sdpa stands for a GPU kernel that takes them)."""
    if spec.attention_sinks and attention == "sdpa":
        raise PlanError(f"transformers runs {spec.family} with eager attention only (its SDPA takes no "
                        "attention sinks): run it with --attention eager")


def default_seq_len(spec: ModelSpec) -> int:
    """`--seq-len` left out: 2,048 tokens, or the model's context when that is shorter (GPT-2's 1,024)."""
    return min(DEFAULT_SEQ_LEN, spec.max_positions)


@dataclass(frozen=True)
class ModelSpec:
    """The shape of a decoder-only transformer, as its Hugging Face config states it.

    `head_dim` is explicit because Gemma-2 does not use hidden_size / num_heads. `num_experts` is 0
    for a dense model. Biases are stated per projection because families differ: Qwen2 has them on
    q/k/v but not on the output projection, Llama's `attention_bias` puts them on all four, GPT-2
    has them everywhere.
    """

    name: str
    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    tied_embeddings: bool
    max_positions: int
    qkv_bias: bool = False
    out_bias: bool = False
    mlp_bias: bool = False
    num_experts: int = 0
    experts_per_token: int = 0
    aliases: tuple[str, ...] = ()
    source: str = ""
    # Dropout probabilities as the config states them; None: the config class's default
    # (`FAMILY_DROPOUT`). GPT-2 drops after the embedding, inside attention and on both residual
    # branches; Phi-3 on both residual branches and inside attention; the others inside attention.
    attn_dropout: float | None = None
    resid_dropout: float | None = None
    embd_dropout: float | None = None
    # Gemma-2's tanh soft-caps of the attention scores and of the logits (a null in the config
    # turns one off); ignored by the other families.
    attn_softcap: bool = True
    final_softcap: bool = True
    # Sliding-window attention as the config states it (None: every layer attends to the whole
    # sequence). Which layers slide is the family's rule (`sliding_layer`); Qwen2's layers below
    # `max_window_layers` attend fully.
    sliding_window: int | None = None
    max_window_layers: int = 0
    # RMSNorm on q and k before rope (`QK_NORMS`); None: the family's (`FAMILY_QK_NORM`), which is
    # the only form transformers builds for it
    qk_norm: str | None = None
    # a sparse block's top-k routing weights divided by their sum (Mixtral always; Qwen3-MoE's
    # `norm_topk_prob`)
    norm_topk: bool = True
    # where the layer's norms sit (`NORM_PLACEMENTS`); None: the family's (`FAMILY_NORM_PLACEMENT`,
    # else "pre"), the only placement transformers builds for it
    norm_placement: str | None = None
    # decoder layers without rotary embeddings (SmolLM3's NoPE layers); with a sliding window, they
    # are the layers that slide
    nope_layers: tuple[int, ...] = ()
    # the full-attention layers of a family with `layer_types` (`LAYER_TYPE_FAMILIES`); every other
    # layer is a sliding one (Gemma 3's with the local rotary embedding)
    global_layers: tuple[int, ...] = ()
    # a learned logit per head that joins every query's softmax and takes no value (GPT-OSS's
    # `sinks`): probability mass the attention can give to nothing
    attention_sinks: bool = False
    # a sparse block's routing and its experts' gate (`ROUTINGS`, `EXPERT_GATES`); None: the family's
    # (`FAMILY_ROUTING`, `FAMILY_EXPERT_GATE`, else the first), the only form transformers builds for it
    routing: str | None = None
    expert_gate: str | None = None
    # Multi-head latent attention (DeepSeek-V3's MLA): keys and values come from one compressed latent
    # of `kv_lora_rank` values per token (`kv_a_proj_with_mqa`, normed, then `kv_b_proj` to every head),
    # queries through a `q_lora_rank` bottleneck (`q_a_proj`, normed, `q_b_proj`; 0: one `q_proj`).
    # 0 `kv_lora_rank`: q, k and v are projected per head. `head_dim` is then the query and key head
    # (qk_nope_head_dim + qk_rope_head_dim).
    kv_lora_rank: int = 0
    q_lora_rank: int = 0
    # `rope_head_dim` values of each query and key head rotate (0: all of head_dim): latent attention's
    # last ones, its key part shared by every head; GLM-4-MoE's first ones (`partial_rotary_factor`).
    # Values are `v_head_dim` wide (0: head_dim)
    rope_head_dim: int = 0
    v_head_dim: int = 0
    # rotary pairs interleaved (x0, x1), (x2, x3), ... rather than split in halves (`rope_interleave`)
    rope_interleave: bool = False
    # the indices of the layers with a gated MLP of `dense_intermediate_size` instead of the sparse
    # block: DeepSeek-V3's and GLM-4-MoE's first `first_k_dense_replace`; Qwen3-MoE's `mlp_only_layers`
    # and those whose (i + 1) is not a multiple of `decoder_sparse_step`
    dense_layers: tuple[int, ...] = ()
    dense_intermediate_size: int = 0
    # a gated MLP of shared_experts x intermediate_size every token goes through beside the routed
    # experts (`n_shared_experts`)
    shared_experts: int = 0
    # the grouped sigmoid routing's groups, groups kept and scale (`ROUTINGS`)
    expert_groups: int = 1
    topk_groups: int = 1
    routed_scaling: float = 1.0
    # the shared expert's width where it is not `shared_experts` x `intermediate_size` (Qwen3-Next's
    # `shared_expert_intermediate_size`), and a sigmoid gate on its output (`shared_expert_gate`, a
    # Linear(hidden, 1) per sparse layer)
    shared_expert_width: int = 0
    shared_expert_gate: bool = False
    # attention's output multiplied by sigmoid of a gate the query projection makes beside the queries
    # (Qwen3-Next: q_proj is 2 x heads x head_dim wide, each head's query then its gate)
    attention_output_gate: bool = False
    # Gated-DeltaNet layers (Qwen3-Next's `linear_attention`): their indices and shapes. Each projects
    # q, k (`linear_key_heads` x `linear_key_head_dim`), v and the output gate z (`linear_value_heads` x
    # `linear_value_head_dim`) in one `in_proj_qkvz`, beta and the decay's a in `in_proj_ba`, convolves
    # q, k and v causally over `linear_conv_kernel` tokens (depthwise), runs the chunked gated delta
    # rule, a gated RMSNorm per value head and `out_proj`
    linear_layers: tuple[int, ...] = ()
    linear_key_heads: int = 0
    linear_value_heads: int = 0
    linear_key_head_dim: int = 0
    linear_value_head_dim: int = 0
    linear_conv_kernel: int = 0

    @property
    def shared_width(self) -> int:
        """The shared expert's gated MLP width: `shared_expert_width`, else `shared_experts` experts'."""
        return self.shared_expert_width or self.shared_experts * self.intermediate_size

    @property
    def offset_norms(self) -> bool:
        """Whether the RMSNorms multiply by (1 + weight) in fp32 before the cast back
        (`OFFSET_NORM_FAMILIES`)."""
        return self.family in OFFSET_NORM_FAMILIES

    def linear_layer(self, i: int) -> bool:
        """Whether decoder layer `i` is a gated-DeltaNet (linear attention) layer."""
        return i in self.linear_layers
    # how tokens reach the experts (`EXPERT_DISPATCHES`); None: the family's (`FAMILY_EXPERT_DISPATCH`,
    # else "gathered"), the only form transformers builds for it
    expert_dispatch: str | None = None
    # Llama 4's chunked attention: each rotary layer's query attends only to the keys of its own
    # `attention_chunk`-token chunk (causally); its NoPE layers attend to everything. None: no chunks
    attention_chunk: int | None = None
    # Llama 4's attention temperature tuning (`attn_temperature_tuning`): the NoPE layers' queries
    # scaled per position, in fp32, before the attention
    nope_temperature: bool = False

    @property
    def expert_rows_per_token(self) -> int:
        """Rows the experts run per token: its top k, gathered (`EXPERT_DISPATCHES`), or one per
        expert where every expert takes every token (Llama 4)."""
        return self.experts_per_token if self.expert_dispatch == "gathered" else self.num_experts

    @property
    def mlp_module(self) -> str:
        """The decoder layer's MLP module name: `mlp`, Llama 4's `feed_forward`."""
        return FAMILY_MLP_MODULE.get(self.family, "mlp")

    @property
    def shared_module(self) -> str:
        """The shared experts' module name inside the MLP: `shared_experts` (DeepSeek-V3, GLM-4-MoE),
        `shared_expert` for Llama 4's and wherever a sigmoid gate scales it (Qwen3-Next, after
        Qwen2-MoE)."""
        if self.shared_expert_gate:
            return "shared_expert"
        return FAMILY_SHARED_MODULE.get(self.family, "shared_experts")

    def qk_norm_layer(self, i: int) -> bool:
        """Whether layer `i` normalises q and k: every layer with a `qk_norm`, but Llama 4's weightless
        one ("l2") sits on its rotary layers only."""
        return bool(self.qk_norm) and (self.qk_norm != "l2" or self.rotary_layer(i))

    def chunked_layer(self, i: int) -> bool:
        """Whether layer `i` attends within `attention_chunk`-token chunks (Llama 4's rotary layers,
        `layer_types` "chunked_attention")."""
        return self.attention_chunk is not None and self.rotary_layer(i)

    def local_span(self, i: int) -> int | None:
        """How far back layer `i`'s mask can reach: the sliding window of a sliding layer, the chunk
        of a chunked one, None for full attention. transformers' SDPA path builds an explicit mask for
        such a layer once the sequence is at least this long (`_ignore_causal_mask_sdpa`)."""
        if self.sliding_layer(i):
            return self.sliding_window
        return self.attention_chunk if self.chunked_layer(i) else None

    @property
    def value_head_dim(self) -> int:
        """Elements of one head's value (and attention output): `v_head_dim`, else `head_dim`."""
        return self.v_head_dim or self.head_dim

    @property
    def rotary_dim(self) -> int:
        """Elements of each query and key head that rotate: `rope_head_dim`, else all of `head_dim`."""
        return self.rope_head_dim or self.head_dim

    def sparse_layer(self, i: int) -> bool:
        """Whether layer `i`'s MLP is the sparse expert block (every layer of an MoE family but the
        `dense_layers`)."""
        return self.num_experts > 0 and i not in self.dense_layers

    def mlp_width(self, i: int) -> int:
        """The gated MLP's width in layer `i` when it is dense (`dense_intermediate_size` for the
        `dense_layers` of a model that has them), else the experts' width."""
        return self.dense_intermediate_size if self.dense_layers and not self.sparse_layer(i) \
            else self.intermediate_size

    def rotary_layer(self, i: int) -> bool:
        """Whether decoder layer `i` rotates q and k (every layer but SmolLM3's NoPE ones)."""
        return self.family != "gpt2" and i not in self.nope_layers

    def sliding_layer(self, i: int) -> bool:
        """Whether decoder layer `i` attends through a sliding window (transformers 5's `layer_types`:
        Gemma-2 even layers, Qwen2 layers from `max_window_layers` on, Mistral, Mixtral and Phi-3 all)."""
        if self.sliding_window is None or self.family in ("gpt2", "llama"):
            return False
        if self.family == "gemma2":
            return i % 2 == 0
        if self.family in QWEN_WINDOWS:
            return i >= self.max_window_layers
        if self.family == "smollm3":
            return i in self.nope_layers
        if self.family in LAYER_TYPE_FAMILIES:
            return i not in self.global_layers
        return True

    def sliding_type(self, i: int) -> bool:
        """Whether layer `i` is a sliding one in the config's `layer_types`, which picks its mask (and
        Gemma 3's rotary embedding) even with no window: Gemma-2's even layers, Gemma 3's all but
        `global_layers`, else `sliding_layer`."""
        if self.family == "gemma2":
            return i % 2 == 0
        if self.family in LAYER_TYPE_FAMILIES:
            return i not in self.global_layers
        if self.attention_chunk is not None:  # (Llama 4's chunked layers: a mask of their own)
            return self.chunked_layer(i)
        return self.sliding_layer(i)

    @property
    def dropout_rates(self) -> tuple[float, float, float]:
        """(attention, residual, embedding) dropout, with the config class's defaults filled in."""
        default = FAMILY_DROPOUT.get(self.family, 0.0)
        return tuple(default if p is None else p
                     for p in (self.attn_dropout, self.resid_dropout, self.embd_dropout))

    def __post_init__(self) -> None:
        from .validate import real_number, whole_number

        if self.family not in FAMILIES:
            raise PlanError(f"unknown model family {self.family!r}; known: {', '.join(FAMILIES)}")
        qk_norm = FAMILY_QK_NORM.get(self.family)
        if self.qk_norm is None:
            object.__setattr__(self, "qk_norm", qk_norm)  # a frozen value, completed once
        elif self.qk_norm != qk_norm and self.qk_norm != OPTIONAL_QK_NORM.get(self.family):
            raise PlanError(f"model {self.name!r}: a {self.family} model has "
                            f"{f'{qk_norm!r} q/k norms' if qk_norm else 'no q/k norms'}, "
                            f"not {self.qk_norm!r}")
        # (an index past the last layer is one a `--layers` slice left out)
        if self.nope_layers and (self.family not in NOPE_FAMILIES or any(
                isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in self.nope_layers)):
            raise PlanError(f"model {self.name!r}: nope_layers must be layer indices of a "
                            f"{' or '.join(NOPE_FAMILIES)} model")
        if (self.attention_chunk is not None or self.nope_temperature) and self.family != "llama4":
            raise PlanError(f"model {self.name!r}: attention_chunk and nope_temperature are a llama4 "
                            "model's")
        if self.attention_chunk is not None:
            whole_number(f"model {self.name!r}: attention_chunk", self.attention_chunk, 1, 10**9)
        if self.global_layers and (self.family not in LAYER_TYPE_FAMILIES or any(
                isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in self.global_layers)):
            raise PlanError(f"model {self.name!r}: global_layers must be layer indices of a "
                            f"{' or '.join(LAYER_TYPE_FAMILIES)} model")
        if self.attention_sinks and self.family != "gpt_oss":
            raise PlanError(f"model {self.name!r}: only a gpt_oss model has attention sinks")
        for name, known, forms in (("routing", FAMILY_ROUTING, ROUTINGS),
                                   ("expert_gate", FAMILY_EXPERT_GATE, EXPERT_GATES),
                                   ("expert_dispatch", FAMILY_EXPERT_DISPATCH, EXPERT_DISPATCHES)):
            form = known.get(self.family, forms[0])
            if getattr(self, name) is None:
                object.__setattr__(self, name, form)
            elif getattr(self, name) != form:
                raise PlanError(f"model {self.name!r}: a {self.family} model's {name} is {form!r}, "
                                f"not {getattr(self, name)!r}")
        _check_latent_and_experts(self)
        _check_linear_attention(self)
        placement = FAMILY_NORM_PLACEMENT.get(self.family, "pre")
        if self.norm_placement is None:
            object.__setattr__(self, "norm_placement", placement)
        elif self.norm_placement != placement:
            raise PlanError(f"model {self.name!r}: a {self.family} model's norms are {placement!r}, "
                            f"not {self.norm_placement!r}")
        for name, (lo, hi) in SHAPE_LIMITS.items():
            value = getattr(self, name)
            if name == "num_experts" and self.family in MOE_FAMILIES:
                lo = 1
            if name == "experts_per_token" and self.family in MOE_FAMILIES:
                lo, hi = 1, self.num_experts
            if name in ("num_experts", "experts_per_token") and self.family not in MOE_FAMILIES:
                hi = 0  # the dense families have no experts
            if name != "sliding_window" or value is not None:
                whole_number(f"model {self.name!r}: {name}", value, lo, hi)
        for name in ("attn_dropout", "resid_dropout", "embd_dropout"):
            value = getattr(self, name)
            if value is not None:
                real_number(f"model {self.name!r}: {name}", value, 0, 1, hi_open=True)
        if self.num_heads % self.num_kv_heads:
            raise PlanError(
                f"model {self.name!r}: num_heads {self.num_heads} is not a multiple of "
                f"num_kv_heads {self.num_kv_heads}"
            )


def _check_latent_and_experts(spec: ModelSpec) -> None:
    """The latent-attention and expert-block fields (see `ModelSpec`) hold together: latent attention
    is DeepSeek-V3's and has a k/v head per query head; the rotating part of a head is even and no
    wider than the head; dense-first layers have a width; expert groups divide the experts, with at
    least two experts each (the router sums each group's best two)."""
    from .validate import real_number, whole_number

    name = f"model {spec.name!r}"
    latent = spec.family == "deepseek_v3"
    if bool(spec.kv_lora_rank) != latent:
        need = "required for" if latent else "only for"
        raise PlanError(f"{name}: kv_lora_rank (latent attention) is {need} a deepseek_v3 model")
    if not latent and (spec.q_lora_rank or spec.v_head_dim or spec.rope_interleave):
        raise PlanError(f"{name}: q_lora_rank, v_head_dim and rope_interleave are latent attention's "
                        "(a deepseek_v3 model)")
    if latent and spec.num_kv_heads != spec.num_heads:
        raise PlanError(f"{name}: latent attention makes a key and a value for every head: "
                        f"num_kv_heads must equal num_heads ({spec.num_heads})")
    if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in spec.dense_layers):
        raise PlanError(f"{name}: dense_layers must be layer indices")
    if spec.dense_layers and spec.family in FIRST_DENSE \
            and sorted(spec.dense_layers) != list(range(len(spec.dense_layers))):
        raise PlanError(f"{name}: a {spec.family} model's dense layers are its first ones "
                        "(first_k_dense_replace)")
    for field_name in ("kv_lora_rank", "q_lora_rank", "v_head_dim", "shared_experts"):
        whole_number(f"{name}: {field_name}", getattr(spec, field_name), 0, 10**6)
    whole_number(f"{name}: rope_head_dim", spec.rope_head_dim, 0, spec.head_dim)
    if spec.rope_head_dim % 2 or (latent and not spec.rope_head_dim):
        raise PlanError(f"{name}: rope_head_dim must be even{' and positive' if latent else ''}, "
                        f"got {spec.rope_head_dim}")
    if spec.family not in MOE_FAMILIES and (spec.dense_layers or spec.shared_experts):
        raise PlanError(f"{name}: dense_layers and shared_experts belong to an expert model")
    if spec.dense_layers:
        whole_number(f"{name}: dense_intermediate_size", spec.dense_intermediate_size, 1, 10**7)
    if spec.routing == "sigmoid-group-topk":
        groups = whole_number(f"{name}: expert_groups", spec.expert_groups, 1, max(spec.num_experts, 1))
        whole_number(f"{name}: topk_groups", spec.topk_groups, 1, groups)
        if spec.num_experts % groups or spec.num_experts // groups < 2:
            raise PlanError(f"{name}: {spec.num_experts} experts do not split into {groups} groups of "
                            "at least two (n_routed_experts: a multiple of n_group, twice it at least)")
        real_number(f"{name}: routed_scaling", spec.routed_scaling, 0, None, lo_open=True)


def _check_linear_attention(spec: ModelSpec) -> None:
    """The gated-DeltaNet fields (see `ModelSpec`) hold together: only a Qwen3-Next model has them,
    with positive head counts and widths, value heads a multiple of key heads (each key head serves
    that many value heads), and a convolution of at least one token; the output gates are its too."""
    from .validate import whole_number

    name = f"model {spec.name!r}"
    mine = spec.family in LINEAR_ATTENTION_FAMILIES
    if not mine and (spec.linear_layers or spec.attention_output_gate or spec.shared_expert_gate
                     or spec.shared_expert_width):
        raise PlanError(f"{name}: linear_layers, attention_output_gate, shared_expert_gate and "
                        f"shared_expert_width belong to a {' or '.join(LINEAR_ATTENTION_FAMILIES)} model")
    if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in spec.linear_layers):
        raise PlanError(f"{name}: linear_layers must be layer indices")
    if not spec.linear_layers:
        return
    for field_name in ("linear_key_heads", "linear_value_heads", "linear_key_head_dim",
                       "linear_value_head_dim", "linear_conv_kernel"):
        whole_number(f"{name}: {field_name}", getattr(spec, field_name), 1, 10**5)
    if spec.linear_value_heads % spec.linear_key_heads:
        raise PlanError(f"{name}: linear_value_heads {spec.linear_value_heads} is not a multiple of "
                        f"linear_key_heads {spec.linear_key_heads}")


# What a shape may hold: (least, most) per ModelSpec field. The upper bounds are far above any
# published model (Llama-3.1-405B: 126 layers, hidden 16,384, vocabulary 128,256; the largest
# vocabularies are ~256k) and keep every byte count an exact, quickly computed int: planning is
# linear in layers (a --fit of 256 layers takes about 2 s of CPU, 512 about 4 s), so 10^5 layers
# would take minutes and 10^19 would never finish.
SHAPE_LIMITS: dict[str, tuple[int, int]] = {
    "vocab_size": (1, 10**7),
    "hidden_size": (1, 10**6),
    "num_layers": (1, 256),
    "num_heads": (1, 10**5),
    "num_kv_heads": (1, 10**5),
    "head_dim": (1, 10**5),
    "intermediate_size": (1, 10**7),
    "max_positions": (1, 10**9),
    "num_experts": (0, 1_024),
    "experts_per_token": (0, 1_024),
    "sliding_window": (1, 10**9),
    "max_window_layers": (0, 10**6),
}


@dataclass(frozen=True)
class TrainSetup:
    """How a model is fine-tuned. Every field is a choice the user can see and change.

    `targets` holds a preset (`default`, `qv`, `attn`, `mlp`, `all-linear`) or module names, matched
    as PEFT matches them. `task` is `causal-lm` or `seq-cls`; a sequence classifier gets a `score`
    head of `num_labels` outputs, which PEFT always trains in full (`modules_to_save`).
    """

    method: str = "lora"
    rank: int = 8
    targets: tuple[str, ...] = ("default",)
    precision: str = "mixed"
    optimizer: str = "adamw"
    bias: str = "none"
    use_dora: bool = False
    modules_to_save: tuple[str, ...] = ()
    double_quant: bool = True
    quantize_experts: bool = False  # QLoRA: quantise fused 3-D experts too (bitsandbytes does not)
    # QLoRA's 4-bit implementation (`quant.QUANT_BACKENDS`; None: the stack's, see stacks.py); with
    # bitsandbytes, the release planned (`quant.BNB_MODELLED` by default) and Linear4bit's compute
    # dtype (bnb_4bit_compute_dtype)
    quant_backend: str | None = None
    bnb_version: str = "0.50.1"
    bnb_compute_dtype: str = "bf16"
    save_dtype: str = "auto"
    task: str = "causal-lm"
    num_labels: int = 2
    tasks: int = 1
    batch_size: int = 1
    seq_len: int = DEFAULT_SEQ_LEN
    attention: str = "sdpa"  # sdpa (flash / memory-efficient kernels) or eager
    grad_checkpointing: bool = False
    # selective layer checkpointing: with grad_checkpointing, only every k-th decoder layer is
    # checkpointed, the others keep their saved sets (torchtune's ac_mode selective, ac_option k;
    # transformers' every_n_layers); which layers the stack's count picks: `activations.checkpointed_layers`
    checkpoint_every: int = 1
    # torchtitan's op-level selective checkpointing (selective_ac_option "op"): each checkpointed layer
    # also keeps every other matmul's output and the fused attention kernel's (`activations.sac_saves`)
    checkpoint_ops: bool = False
    dropout: float | None = None  # None: the model's own (config.json); else every dropout of the model
    lora_dropout: float = 0.0
    # the adapters' dtype (`adapter_dtype.py`): auto keeps the precision's; fp32 is PEFT's default
    # on a 16-bit model (get_peft_model's autocast_adapter_dtype=True)
    adapter_dtype: str = "auto"
    # torchtune's optimizer_in_bwd: one optimizer per parameter, stepped in the parameter's
    # post-accumulate-grad hook, which frees its gradient (`step.in_backward_steps`)
    optimizer_in_backward: bool = False
    # packed documents: the micro-batch's batch_size sequences of seq_len tokens as one row, position
    # ids restarting per sequence (TRL's padding_free); see `step.conditions`. torchtune's packed datasets
    # are not this: each row is already a pack of seq_len tokens, batch x seq_len without packing
    packing: bool = False
    # Data parallelism: None plans whole-model totals; N plans one of N GPUs (see sharding.py).
    num_gpus: int | None = None
    sharding: str = "none"  # none | zero1 | zero2 | zero3 | fsdp (PyTorch FSDP2)
    offload: str = "none"  # none | optimizer | optimizer+params
    reshard_after_forward: bool = True  # FSDP2's, for the blocks (the root never reshards)
    # DeepSpeed ZeRO-3 run-time settings in parameters; None: the Hugging Face "auto" value
    zero3_max_live_parameters: int | None = None
    zero3_prefetch_bucket_size: int | None = None
    reduce_bucket_size: int | None = None
    zero3_param_persistence_threshold: int | None = None
    # The training stack and its kernels (see stacks.py); None: the stack's preset default.
    stack: str = "hf-trainer"  # torch | hf-trainer | trl | torchtune
    optimizer_impl: str | None = None  # fused | foreach | for-loop
    loss: str | None = None  # standard | chunked | fused-linear
    loss_chunks: int | None = None  # chunked cross-entropy: number of chunks (torchtune: 8)
    activation_offload: bool | None = None  # checkpointed layer inputs kept in CPU memory
    # torch.compile (inductor): none, each decoder layer (torchtune's `compile=True`) or the whole
    # model (the Trainer's `torch_compile`); None: the stack's preset (see `compiled.py`)
    compile: str | None = None

    def with_(self, **changes) -> TrainSetup:
        return replace(self, **changes)


@dataclass(frozen=True)
class DenseSize:
    """A hypothetical dense model known only by its parameter count (`--params 70e9`).

    Only model states and checkpoint data can be planned for it: LoRA needs layer shapes.
    """

    total_params: int
    name: str = field(default="")

    def __post_init__(self) -> None:
        if self.total_params <= 0:
            raise PlanError(f"--params must be positive, got {self.total_params}")


def _read_config_json(path: Path) -> dict:
    from .validate import read_json_file

    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise PlanError(f"no config.json at {path}")
    return read_json_file(path)


def spec_from_config_file(path: str | Path) -> ModelSpec:
    """Read a Hugging Face `config.json` (a file, or a folder holding one)."""
    from pathlib import Path

    path = Path(path)
    config = _read_config_json(path)
    try:
        return spec_from_hf_config(config, name=config_display_name(path, config), source=str(path))
    except PlanError as exc:
        # name the file the user gave, not the generic config.json
        file = path / "config.json" if path.is_dir() else path
        raise PlanError(str(exc).replace("config.json", str(file), 1)) from None


def config_display_name(path: Path, config: dict) -> str:
    """What to call a local model: its folder, or the file's stem when the file is not `config.json`
    (`llama-tiny.json`); `_name_or_path` when the file sits loose as `config.json`."""
    resolved = path.resolve()
    if resolved.is_dir():
        return resolved.name
    if resolved.name != "config.json":
        return resolved.stem
    named = config.get("_name_or_path") if isinstance(config, dict) else None
    if isinstance(named, str) and named.strip():
        return named.strip()[:200]
    return resolved.parent.name or resolved.name


_MISSING = object()


def _whole(config: dict, field_name: str, *keys: str, default=_MISSING, least: int | None = None) -> int:
    """The first of `keys` the config sets (not null), as a whole number within `SHAPE_LIMITS` of
    the ModelSpec field it fills; `default` when none is set, else an error naming the keys."""
    from .validate import whole_number

    for key in keys:
        if config.get(key) is not None:
            lo, hi = SHAPE_LIMITS[field_name]
            lo = lo if least is None else least
            return whole_number(f"config.json {key}", config[key], lo, hi)
    if default is not _MISSING:
        return default
    raise PlanError(f"config.json has no {' / '.join(keys)}")


def _rate(config: dict, key: str) -> float | None:
    """A dropout probability from the config; None (the class default) when absent or null."""
    from .validate import real_number

    value = config.get(key)
    return None if value is None else real_number(f"config.json {key}", value, 0, 1, hi_open=True)


def _flag(config: dict, key: str, default: bool) -> bool:
    from .validate import flag

    return flag(f"config.json {key}", config.get(key), default)


def _softcap(config: dict, key: str, default: float) -> bool:
    """Gemma-2's soft-cap: on unless the config sets it to null; a value must be a positive number."""
    from .validate import real_number

    value = config.get(key, default)
    if value is None:
        return False
    real_number(f"config.json {key}", value, 0, None, lo_open=True)
    return True


def unsupported_model_type(model_type: object) -> PlanError:
    """The error for a model_type no family of ours lays out and `lora-plan plan` does not record
    from transformers either (`measure.recorded`)."""
    return PlanError(f"config.json model_type {model_type!r} is not supported; supported: "
                     f"{', '.join(sorted(MODEL_TYPE_TO_FAMILY))}, or any decoder-only causal LM the "
                     "installed transformers builds, planned from a local config.json with the measure "
                     "extra")


def spec_from_hf_config(config: dict, name: str = "custom", source: str = "") -> ModelSpec:
    """Map a Hugging Face config dict onto a `ModelSpec`, for the families we lay out exactly.

    Defaults follow each transformers config class: a missing `num_key_value_heads` means multi-head
    attention, a missing `head_dim` means hidden_size / num_heads, a missing GPT-2 `n_inner` means
    4 * n_embd, a missing Mixtral `num_local_experts` / `num_experts_per_tok` means 8 / 2 (Qwen3-MoE's
    `num_experts` / `num_experts_per_tok` 128 / 8, its `moe_intermediate_size` 768, `norm_topk_prob`
    false), a missing Qwen3 `head_dim` means 128, a missing OLMo 2 `max_position_embeddings` 2,048, a
    missing Gemma 3 `head_dim` 256, its `max_position_embeddings` 131,072, its soft-caps none and its
    `layer_types` every `sliding_window_pattern`-th (6th) layer global, DeepSeek-V3's and GLM-4-MoE's
    those of `_latent_fields` and `_glm4_moe_fields`, and `tie_word_embeddings`
    defaults to True only where the class does (GPT-2, Gemma-2, Gemma 3, SmolLM3). GPT-OSS's class
    defaults: 128 experts, 4 per token, head_dim 64, attention biases on, a 128-token window on every
    other layer (layer_types), 131,072 positions. Every value
    read is checked here (type, finiteness, `SHAPE_LIMITS`), each failure one line naming the key.
    """
    from .validate import text

    if not isinstance(config, dict):
        raise PlanError("config.json must hold a JSON object")
    model_type = config.get("model_type")
    if isinstance(model_type, str) and model_type in MULTIMODAL_TEXT:  # its language model is planned
        config = _language_model(config, *MULTIMODAL_TEXT[model_type])
        model_type = config["model_type"]
    family = MODEL_TYPE_TO_FAMILY.get(text("config.json model_type", model_type)
                                      if model_type is not None else None)
    if family is None:
        raise unsupported_model_type(model_type)
    if family == "gpt2":
        hidden = _whole(config, "hidden_size", "n_embd", "hidden_size")
        heads = _whole(config, "num_heads", "n_head", "num_attention_heads")
        if hidden % heads:  # transformers' GPT2Attention refuses it too
            raise PlanError(f"config.json n_embd {hidden} is not a multiple of n_head {heads}")
        return ModelSpec(
            name=name, family=family, source=source,
            vocab_size=_whole(config, "vocab_size", "vocab_size"),
            hidden_size=hidden,
            num_layers=_whole(config, "num_layers", "n_layer", "num_hidden_layers"),
            num_heads=heads, num_kv_heads=heads, head_dim=hidden // heads,
            intermediate_size=_whole(config, "intermediate_size", "n_inner", default=4 * hidden),
            tied_embeddings=_flag(config, "tie_word_embeddings", True),
            max_positions=_whole(config, "max_positions", "n_positions", "max_position_embeddings"),
            qkv_bias=True, out_bias=True, mlp_bias=True,
            attn_dropout=_rate(config, "attn_pdrop"),
            resid_dropout=_rate(config, "resid_pdrop"),
            embd_dropout=_rate(config, "embd_pdrop"),
        )
    hidden = _whole(config, "hidden_size", "hidden_size")
    heads = _whole(config, "num_heads", "num_attention_heads")
    kv_heads = _whole(config, "num_kv_heads", "num_key_value_heads", default=heads)
    if heads % kv_heads:
        raise PlanError(f"config.json num_attention_heads {heads} is not a multiple of "
                        f"num_key_value_heads {kv_heads}")
    head_dim_default = HEAD_DIM_DEFAULT.get(family, hidden // heads)
    if head_dim_default == 0 and config.get("head_dim") is None:
        raise PlanError(f"config.json hidden_size {hidden} is smaller than num_attention_heads {heads} "
                        "and no head_dim is given")
    moe = family in MOE_FAMILIES
    experts_keys = MOE_EXPERTS_KEYS.get(family, ("num_experts",))
    experts_key = experts_keys[0]
    experts = _whole(config, "num_experts", *experts_keys, default=MOE_DEFAULTS[family][0],
                     least=1) if moe else 0
    top_k = _whole(config, "experts_per_token", "num_experts_per_tok", default=MOE_DEFAULTS[family][1],
                   least=1) if moe else 0
    if moe and top_k > experts:
        raise PlanError(f"config.json num_experts_per_tok {top_k} is more than {experts_key} {experts}")
    window = _sliding_window(config, family)
    attention_bias = _flag(config, "attention_bias", family == "gpt_oss")
    layers = _whole(config, "num_layers", "num_hidden_layers")
    latent = (_latent_fields(config) if family == "deepseek_v3"
              else _glm4_moe_fields(config, head_dim_default) if family == "glm4_moe"
              else _qwen3_moe_dense_fields(config, layers) if family == "qwen3_moe"
              else _qwen3_next_fields(config, layers, head_dim_default) if family == "qwen3_next"
              else _llama4_fields(config, layers) if family == "llama4" else {})
    latent_head_dim = latent.pop("head_dim", 0)
    family_width = latent.pop("intermediate_size", 0)
    return ModelSpec(**latent,
        name=name, family=family, source=source,
        vocab_size=_whole(config, "vocab_size", "vocab_size"),
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        # latent attention's query and key heads are qk_nope_head_dim + qk_rope_head_dim wide (its
        # config class sets `head_dim` to the rotary part: not read)
        head_dim=latent_head_dim or _whole(config, "head_dim", "head_dim", default=head_dim_default),
        # Qwen3-MoE's experts are `moe_intermediate_size` wide (its `intermediate_size` is for dense
        # layers: `dense_intermediate_size`)
        intermediate_size=family_width or (_whole(config, "intermediate_size", "moe_intermediate_size",
                                                  default=MOE_INTERMEDIATE_DEFAULT[family])
                                           if family in MOE_INTERMEDIATE_DEFAULT
                                           else _whole(config, "intermediate_size", "intermediate_size")),
        tied_embeddings=_flag(config, "tie_word_embeddings", family in ("gemma2", "gemma3", "smollm3")),
        max_positions=_whole(config, "max_positions", "max_position_embeddings",
                             default=MAX_POSITIONS_DEFAULT.get(family, 4096)),
        # (latent attention: the bias is on q_a_proj, kv_a_proj_with_mqa and o_proj)
        qkv_bias=family == "qwen2" or attention_bias,
        # (GLM-4-MoE's o_proj never has one)
        out_bias=family not in ("qwen2", "glm4_moe") and attention_bias,
        # Qwen3's, OLMo 2's, Gemma 3's, DeepSeek-V3's and GLM-4-MoE's MLPs and experts have no bias
        # whatever the config says; GPT-OSS's router and experts always have them
        mlp_bias=family == "gpt_oss" or (
            family not in ("qwen3", "qwen3_moe", "olmo2", "gemma3", "deepseek_v3", "glm4_moe", "qwen3_next",
                           "llama4")
            and _flag(config, "mlp_bias", False)),
        num_experts=experts,
        experts_per_token=top_k,
        # (GPT-OSS's softmax over the top k logits needs no normalising; Llama 4's sigmoid none)
        norm_topk=family not in ("gpt_oss", "llama4") and (family not in NORM_TOPK_DEFAULT
                                           or _flag(config, "norm_topk_prob", NORM_TOPK_DEFAULT[family])),
        nope_layers=_nope_layers(config, layers) if family in NOPE_FAMILIES else (),
        global_layers=_global_layers(config, layers, family) if family in LAYER_TYPE_FAMILIES else (),
        attention_sinks=family == "gpt_oss",
        attn_dropout=_rate(config, "attention_dropout"),
        # Phi-3 drops on both residual branches; its embd_pdrop is read by no module in
        # transformers 5, so it is not planned
        resid_dropout=_rate(config, "resid_pdrop") if family == "phi3" else None,
        attn_softcap=family not in GEMMA_FAMILIES or _softcap(config, "attn_logit_softcapping",
                                                              SOFTCAP_DEFAULTS[family][0]),
        final_softcap=family not in GEMMA_FAMILIES or _softcap(config, "final_logit_softcapping",
                                                               SOFTCAP_DEFAULTS[family][1]),
        sliding_window=window,
        # which layers slide matters only where a window applies
        max_window_layers=(_whole(config, "max_window_layers", "max_window_layers", default=28)
                           if family in QWEN_WINDOWS and window is not None else 0),
    )


# The config classes' `sliding_window` when a config.json leaves it out (Qwen2's applies only with
# `use_sliding_window`)
SLIDING_WINDOW_DEFAULT = {"mistral": 4096, "gemma2": 4096, "qwen2": 4096, "qwen3": 4096,
                          "qwen3_moe": 4096, "gemma3": 4096, "gpt_oss": 128}
# The config classes' `max_position_embeddings` when a config.json leaves it out, where not 4,096
MAX_POSITIONS_DEFAULT = {"olmo2": 2048, "smollm3": 32768, "gemma3": 131072, "gpt_oss": 131072,
                         "glm4_moe": 131072, "qwen3_next": 32768,
                         "llama4": 131072}
# The config classes' (attention, final) logit soft-caps when a config.json leaves them out
SOFTCAP_DEFAULTS = {"gemma2": (50.0, 30.0), "gemma3": (None, None)}
# The config classes' (experts, experts per token) when a config.json leaves them out
MOE_DEFAULTS = {"mixtral": (8, 2), "qwen3_moe": (128, 8), "gpt_oss": (128, 4), "deepseek_v3": (256, 8),
                "glm4_moe": (128, 8), "qwen3_next": (512, 10),
                "llama4": (16, 1)}
# The keys naming the number of experts, first found wins, where not `num_experts` (GptOssConfig and
# Qwen3MoeConfig map num_experts onto num_local_experts, the key a config they save holds)
MOE_EXPERTS_KEYS = {"mixtral": ("num_local_experts",), "llama4": ("num_local_experts",),
                    "gpt_oss": ("num_local_experts", "num_experts"),
                    "qwen3_moe": ("num_experts", "num_local_experts"),
                    "deepseek_v3": ("n_routed_experts",), "glm4_moe": ("n_routed_experts",)}
# Where a config without `layer_types` puts its full-attention layers: every n-th layer, n from the
# key named, else this default (Gemma 3's sliding_window_pattern; GPT-OSS alternates, odd layers full)
GLOBAL_EVERY = {"gemma3": ("sliding_window_pattern", 6), "gpt_oss": (None, 2)}
# The experts' width (`moe_intermediate_size`) when a config.json leaves it out
MOE_INTERMEDIATE_DEFAULT = {"qwen3_moe": 768, "deepseek_v3": 2048, "glm4_moe": 1408, "qwen3_next": 512}
# `norm_topk_prob` when a config.json leaves it out, for the families that read it
NORM_TOPK_DEFAULT = {"qwen3_moe": False, "deepseek_v3": True, "glm4_moe": True, "qwen3_next": True}


def _shared_expert_fields(config: dict, dense: int, dense_width: int, shared: int, groups: int,
                          topk_groups: int, scaling: float) -> dict:
    """The expert-block keys DeepSeek-V3 and GLM-4-MoE share, with the config class's defaults given:
    `first_k_dense_replace` dense layers of `intermediate_size`, `n_shared_experts`, `n_group`,
    `topk_group` and `routed_scaling_factor`."""
    from .validate import real_number, whole_number

    def whole(key: str, default: int, lo: int = 1, hi: int = 10**6) -> int:
        value = config.get(key, default)
        return whole_number(f"config.json {key}", default if value is None else value, lo, hi)

    first = whole("first_k_dense_replace", dense, 0)
    return {
        "dense_layers": tuple(range(first)),
        "dense_intermediate_size": whole("intermediate_size", dense_width, 1, 10**7) if first else 0,
        "shared_experts": whole("n_shared_experts", shared),
        "expert_groups": whole("n_group", groups), "topk_groups": whole("topk_group", topk_groups),
        "routed_scaling": real_number("config.json routed_scaling_factor",
                                      config.get("routed_scaling_factor", scaling), 0, None, lo_open=True),
    }


def _glm4_moe_fields(config: dict, head_dim_default: int) -> dict:
    """GLM-4-MoE's fields beyond Llama's, with `Glm4MoeConfig`'s defaults: the first
    `partial_rotary_factor` (0.5) of each head rotates (at the top level, or in `rope_parameters`),
    q/k norms per head with `use_qk_norm` (false), first_k_dense_replace 1 dense layer of
    intermediate_size 10,944, n_shared_experts 1, n_group 1, topk_group 1, routed_scaling_factor 1.
    The multi-token-prediction layer a checkpoint may hold is not built by transformers."""
    from .validate import real_number

    head_dim = _whole(config, "head_dim", "head_dim", default=head_dim_default)
    rope = config.get("rope_parameters") if isinstance(config.get("rope_parameters"), dict) else {}
    factor = real_number("config.json partial_rotary_factor",
                         config.get("partial_rotary_factor", rope.get("partial_rotary_factor", 0.5)),
                         0, 1, lo_open=True)
    rotary = int(head_dim * factor)
    if rotary % 2 or not rotary:
        raise PlanError(f"config.json partial_rotary_factor {factor:g} of head_dim {head_dim} rotates "
                        f"{rotary} values a head: rotary pairs need an even, positive number")
    return {"head_dim": head_dim, "rope_head_dim": 0 if rotary == head_dim else rotary,
            "qk_norm": "head" if _flag(config, "use_qk_norm", False) else None,
            **_shared_expert_fields(config, 1, 10944, 1, 1, 1, 1.0)}


def _llama4_fields(config: dict, layers: int) -> dict:
    """Llama 4's fields beyond Llama's, with `Llama4TextConfig`'s defaults: experts and the shared
    expert `intermediate_size` (8,192) wide; the layers not in `moe_layers` (else every
    `interleave_moe_layer_step`-th layer from step - 1, default 1: all sparse) dense, of
    `intermediate_size_mlp` (16,384); a weightless q/k norm on the rotary layers with `use_qk_norm`
    (true); rotary layers attending in `attention_chunk_size` chunks (8,192; null: none); NoPE layers'
    queries scaled with `attn_temperature_tuning` (true)."""
    from .validate import whole_number

    def whole(key: str, default: int, lo: int = 1, hi: int = 10**7) -> int:
        value = config.get(key)
        return whole_number(f"config.json {key}", default if value is None else value, lo, hi)

    moe = config.get("moe_layers")
    if moe is None:
        step = whole("interleave_moe_layer_step", 1, 1, 10**6)
        moe = list(range(step - 1, layers, step))
    if not isinstance(moe, list) or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in moe):
        raise PlanError("config.json moe_layers must be a list of layer indices")
    dense = tuple(i for i in range(layers) if i not in moe)
    chunk = config.get("attention_chunk_size", 8192)
    tuning = config.get("attn_temperature_tuning", True)
    if not isinstance(tuning, (bool, int)):
        raise PlanError(f"config.json attn_temperature_tuning must be true or false, got {tuning!r}")
    fields = {
        "intermediate_size": whole("intermediate_size", 8192),
        "dense_layers": dense,
        "dense_intermediate_size": whole("intermediate_size_mlp", 16384) if dense else 0,
        "shared_experts": 1, "qk_norm": "l2" if _flag(config, "use_qk_norm", True) else None,
        "attention_chunk": None if chunk is None else whole_number("config.json attention_chunk_size",
                                                                   chunk, 1, 10**9),
        "nope_temperature": bool(tuning),
    }
    nope = _nope_layers(config, layers)
    kinds = config.get("layer_types")
    expected = ["chunked_attention" if fields["attention_chunk"] is not None and i not in nope
                else "full_attention" for i in range(layers)]
    if kinds is not None and (not isinstance(kinds, list) or kinds[:layers] != expected):
        # transformers masks by layer_types but rotates by no_rope_layers: only the pairing its config
        # class derives (chunked exactly on the rotary layers) is planned
        raise PlanError("config.json layer_types must chunk exactly the rotary layers (no_rope_layers) "
                        "when attention_chunk_size is set; other layouts are not planned")
    return fields


def _latent_fields(config: dict) -> dict:
    """DeepSeek-V3's latent attention and expert-block fields, with `DeepseekV3Config`'s defaults:
    q_lora_rank 1,536 (null: one q_proj), kv_lora_rank 512, qk_nope_head_dim 128, qk_rope_head_dim 64,
    v_head_dim 128, rope_interleave true; first_k_dense_replace 3 dense layers of intermediate_size
    18,432; n_shared_experts 1; n_group 8, topk_group 4, routed_scaling_factor 2.5. `head_dim` is
    returned as qk_nope_head_dim + qk_rope_head_dim. The multi-token-prediction layer a checkpoint
    may hold (`num_nextn_predict_layers`) is not built by transformers and not planned."""
    from .validate import whole_number

    def whole(key: str, default: int | None, lo: int = 1, hi: int = 10**6) -> int:
        value = config.get(key, default)
        return 0 if value is None else whole_number(f"config.json {key}", value, lo, hi)

    nope, rope = whole("qk_nope_head_dim", 128, 0), whole("qk_rope_head_dim", 64)
    if rope % 2:
        raise PlanError(f"config.json qk_rope_head_dim must be even (rotary pairs), got {rope}")
    if config.get("head_dim") is not None and config["head_dim"] != rope:
        # the rotary embedding is head_dim wide: another width fails in transformers' rope
        raise PlanError(f"config.json head_dim {config['head_dim']!r} must equal qk_rope_head_dim {rope} "
                        "(DeepseekV3Config sets it so; it is the rotary embedding's width)")
    if "q_lora_rank" in config and config["q_lora_rank"] is None:
        q_rank = 0
    else:
        q_rank = whole("q_lora_rank", 1536)
    return {
        "head_dim": nope + rope, "rope_head_dim": rope, "kv_lora_rank": whole("kv_lora_rank", 512),
        "q_lora_rank": q_rank, "v_head_dim": whole("v_head_dim", 128),
        "rope_interleave": _flag(config, "rope_interleave", True),
        **_shared_expert_fields(config, 3, 18432, 1, 8, 4, 2.5),
    }


def _nope_layers(config: dict, layers: int) -> tuple[int, ...]:
    """SmolLM3's layers without rotary embeddings: those whose `no_rope_layers` flag is 0 (1: rope),
    or, without the list, every `no_rope_layer_interval`-th layer (4: layers 3, 7, 11, ...), as
    `SmolLM3Config` fills it in."""
    from .validate import whole_number

    flags = config.get("no_rope_layers")
    if flags is None or flags == []:  # (Llama4TextConfig reads an empty list as none given)
        every = whole_number("config.json no_rope_layer_interval",
                             config.get("no_rope_layer_interval", 4), 1, 10**6)
        return tuple(i for i in range(layers) if (i + 1) % every == 0)
    if not isinstance(flags, list) or len(flags) < layers:
        raise PlanError(f"config.json no_rope_layers must be a list of {layers} flags (1: rope, 0: none)")
    return tuple(i for i in range(layers)
                 if not whole_number(f"config.json no_rope_layers[{i}]", flags[i], 0, 1))


# `Gemma3TextConfig`'s shapes, which a multimodal config's `text_config` states only where they differ
GEMMA3_TEXT_DEFAULTS = {"vocab_size": 262208, "hidden_size": 2304, "intermediate_size": 9216,
                        "num_hidden_layers": 26, "num_attention_heads": 8, "num_key_value_heads": 4}


# `Llama4TextConfig`'s shapes, likewise
# A multimodal model_type -> (its language model's model_type, the text config class's shapes, whether
# the LM head is tied to the embedding unless a config says otherwise)
LLAMA4_TEXT_DEFAULTS = {"vocab_size": 202048, "hidden_size": 5120, "num_hidden_layers": 48,
                        "num_attention_heads": 40, "num_key_value_heads": 8}
MULTIMODAL_TEXT = {"gemma3": ("gemma3_text", GEMMA3_TEXT_DEFAULTS, True),
                   "llama4": ("llama4_text", LLAMA4_TEXT_DEFAULTS, False)}


def _language_model(config: dict, model_type: str, defaults: dict, tied_default: bool) -> dict:
    """The text config of a multimodal config.json (`Gemma3Config`, `Llama4Config`): its `text_config`
    over the text config class's `defaults`, the LM head tied as the outer config says, else as the
    text config says, else `tied_default`. Its vision tower and projector are not planned."""
    text = config.get("text_config", {})
    if text is None:
        text = {}
    if not isinstance(text, dict):
        raise PlanError("config.json text_config must be a JSON object")
    tied = config.get("tie_word_embeddings", text.get("tie_word_embeddings", tied_default))
    return {**defaults, **text, "model_type": model_type, "tie_word_embeddings": tied}


def _global_layers(config: dict, layers: int, family: str) -> tuple[int, ...]:
    """The full-attention layers of Gemma 3 or GPT-OSS: those `layer_types` names "full_attention",
    or, without the list, every n-th layer as the config class fills it in (`GLOBAL_EVERY`: Gemma 3
    every `sliding_window_pattern`-th, 6: layers 5, 11, 17, ...; GPT-OSS every second: 1, 3, 5, ...).
    A bidirectional config (`use_bidirectional_attention`) masks otherwise: refused."""
    from .validate import whole_number

    if _flag(config, "use_bidirectional_attention", False):
        raise PlanError("config.json use_bidirectional_attention: only causal models are planned")
    if "sliding_window" in config and config["sliding_window"] is None:
        raise PlanError(f"config.json sliding_window must be a number for a {family} model (its sliding "
                        "layers always build a windowed mask)")
    kinds = config.get("layer_types")
    if kinds is None:
        key, default = GLOBAL_EVERY[family]
        every = (whole_number(f"config.json {key}", config.get(key, default), 1, 10**6)
                 if key else default)
        return tuple(i for i in range(layers) if (i + 1) % every == 0)
    allowed = ("sliding_attention", "full_attention")
    if not isinstance(kinds, list) or len(kinds) < layers or any(k not in allowed for k in kinds[:layers]):
        raise PlanError(f"config.json layer_types must be a list of {layers} names, each "
                        f"{' or '.join(allowed)}")
    return tuple(i for i in range(layers) if kinds[i] == "full_attention")


def _qwen3_moe_dense_fields(config: dict, layers: int, width_default: int = 6144) -> dict:
    """Qwen3-MoE's dense layers, as `Qwen3MoeDecoderLayer` picks them: layer i is dense (a gated MLP
    of `intermediate_size`, default 6144; Qwen3-Next's 5632) when i is in `mlp_only_layers` or (i + 1)
    is not a multiple of `decoder_sparse_step` (default 1: none)."""
    from .validate import whole_number

    step = config.get("decoder_sparse_step")
    step = 1 if step is None else whole_number("config.json decoder_sparse_step", step, 1, 10**6)
    only = config.get("mlp_only_layers")
    if only is None:
        only = []
    if not isinstance(only, list) or any(isinstance(i, bool) or not isinstance(i, int) or i < 0
                                         for i in only):
        raise PlanError("config.json mlp_only_layers must be a list of layer indices")
    dense = tuple(i for i in range(layers) if i in only or (i + 1) % step)
    width = config.get("intermediate_size")
    return {"dense_layers": dense,
            "dense_intermediate_size": whole_number("config.json intermediate_size",
                                                    width_default if width is None else width, 1, 10**7)
            if dense else 0}


def _qwen3_next_fields(config: dict, layers: int, head_dim_default: int) -> dict:
    """Qwen3-Next's fields beyond Qwen3-MoE's, with `Qwen3NextConfig`'s defaults: `layer_types`
    (without it, every `full_attention_interval`-th (4th) layer full, the others linear), the
    gated-DeltaNet shapes (linear_num_key_heads 16, linear_num_value_heads 32, linear_key_head_dim and
    linear_value_head_dim 128, linear_conv_kernel_dim 4), the first `partial_rotary_factor` (0.25) of
    each head rotating, one gated shared expert of `shared_expert_intermediate_size` (512), the
    attention's output gate, and Qwen3-MoE's dense layers (`intermediate_size` 5632). A config without
    experts (num_experts 0: every layer dense) is refused by the expert count's check."""
    from .validate import real_number, whole_number

    def whole(key: str, default: int) -> int:
        value = config.get(key)
        return whole_number(f"config.json {key}", default if value is None else value, 1, 10**5)

    kinds = config.get("layer_types")
    allowed = ("linear_attention", "full_attention")
    if kinds is None:
        every = whole("full_attention_interval", 4)
        kinds = ["linear_attention" if (i + 1) % every else "full_attention" for i in range(layers)]
    if not isinstance(kinds, list) or len(kinds) < layers or any(k not in allowed for k in kinds[:layers]):
        raise PlanError(f"config.json layer_types must be a list of {layers} names, each "
                        f"{' or '.join(allowed)}")
    head_dim = _whole(config, "head_dim", "head_dim", default=head_dim_default)
    rope = config.get("rope_parameters") if isinstance(config.get("rope_parameters"), dict) else {}
    factor = real_number("config.json partial_rotary_factor",
                         config.get("partial_rotary_factor", rope.get("partial_rotary_factor", 0.25)),
                         0, 1, lo_open=True)
    rotary = int(head_dim * factor)
    if rotary % 2 or not rotary:
        raise PlanError(f"config.json partial_rotary_factor {factor:g} of head_dim {head_dim} rotates "
                        f"{rotary} values a head: rotary pairs need an even, positive number")
    return {"head_dim": head_dim, "rope_head_dim": 0 if rotary == head_dim else rotary,
            **_qwen3_moe_dense_fields(config, layers, 5632),
            "linear_layers": tuple(i for i in range(layers) if kinds[i] == "linear_attention"),
            "linear_key_heads": whole("linear_num_key_heads", 16),
            "linear_value_heads": whole("linear_num_value_heads", 32),
            "linear_key_head_dim": whole("linear_key_head_dim", 128),
            "linear_value_head_dim": whole("linear_value_head_dim", 128),
            "linear_conv_kernel": whole("linear_conv_kernel_dim", 4),
            "shared_experts": 1, "shared_expert_width": whole("shared_expert_intermediate_size", 512),
            "shared_expert_gate": True, "attention_output_gate": True}


# The config classes' `head_dim` when a config.json leaves it out, where it is not hidden / heads
HEAD_DIM_DEFAULT = {"qwen3": 128, "gemma3": 256, "gpt_oss": 64, "qwen3_next": 256, "llama4": 128}


def _sliding_window(config: dict, family: str) -> int | None:
    if family in ("llama", "gpt2", "olmo2", "deepseek_v3", "glm4_moe", "qwen3_next",
                  "llama4") or (
            family in (*QWEN_WINDOWS, "qwen3_moe", "smollm3")
            and not _flag(config, "use_sliding_window", False)):
        return None
    if "sliding_window" in config and config["sliding_window"] is None:
        return None
    return _whole(config, "sliding_window", "sliding_window", default=SLIDING_WINDOW_DEFAULT.get(family))


def to_hf_config(spec: ModelSpec) -> dict:
    """The Hugging Face config dict that builds this shape (the inverse of `spec_from_hf_config`).

    Used to build the real model (on the meta device in tests, for real in `measure`), so the
    planner and transformers always describe the same network.
    """
    if spec.family == "gpt2":
        return {
            "model_type": "gpt2", "vocab_size": spec.vocab_size, "n_embd": spec.hidden_size,
            "n_layer": spec.num_layers, "n_head": spec.num_heads,
            "n_inner": spec.intermediate_size, "n_positions": spec.max_positions,
            "tie_word_embeddings": spec.tied_embeddings,
            **{key: p for key, p in zip(("attn_pdrop", "resid_pdrop", "embd_pdrop"),
                                        (spec.attn_dropout, spec.resid_dropout, spec.embd_dropout),
                                        strict=True) if p is not None},
        }
    config = {
        "model_type": FAMILY_MODEL_TYPE.get(spec.family, spec.family), "vocab_size": spec.vocab_size,
        "hidden_size": spec.hidden_size,
        "num_hidden_layers": spec.num_layers, "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads, "head_dim": spec.head_dim,
        "intermediate_size": spec.intermediate_size, "tie_word_embeddings": spec.tied_embeddings,
        "max_position_embeddings": spec.max_positions,
        # Token ids are irrelevant to shapes; None keeps small test vocabularies valid.
        "pad_token_id": None, "bos_token_id": None, "eos_token_id": None,
    }
    if spec.family in ("llama", "gemma2", "qwen3", "qwen3_moe", "olmo2", "smollm3", "gemma3"):
        config["attention_bias"] = spec.out_bias
        config["mlp_bias"] = spec.mlp_bias
    if spec.attn_dropout is not None:
        config["attention_dropout"] = spec.attn_dropout
    if spec.family == "phi3" and spec.resid_dropout is not None:
        config["resid_pdrop"] = spec.resid_dropout
    if spec.family == "gemma2":
        if not spec.attn_softcap:
            config["attn_logit_softcapping"] = None
        if not spec.final_softcap:
            config["final_logit_softcapping"] = None
    if spec.family == "gemma3":
        # its classes cap nothing by default; a cap the spec has on takes Gemma-2's value
        config["attn_logit_softcapping"] = 50.0 if spec.attn_softcap else None
        config["final_logit_softcapping"] = 30.0 if spec.final_softcap else None
        config["layer_types"] = ["sliding_attention" if spec.sliding_type(i) else "full_attention"
                                 for i in range(spec.num_layers)]
        config["sliding_window"] = spec.sliding_window
    if spec.family == "mixtral":
        config["num_local_experts"] = spec.num_experts
        config["num_experts_per_tok"] = spec.experts_per_token
    if spec.family == "qwen3_moe":
        config.update(num_experts=spec.num_experts, num_experts_per_tok=spec.experts_per_token,
                      moe_intermediate_size=spec.intermediate_size, norm_topk_prob=spec.norm_topk,
                      decoder_sparse_step=1, mlp_only_layers=list(spec.dense_layers),
                      intermediate_size=spec.dense_intermediate_size or spec.intermediate_size)
    if spec.family == "qwen3_next":
        config.update(num_experts=spec.num_experts, num_experts_per_tok=spec.experts_per_token,
                      moe_intermediate_size=spec.intermediate_size, norm_topk_prob=spec.norm_topk,
                      decoder_sparse_step=1, mlp_only_layers=list(spec.dense_layers),
                      intermediate_size=spec.dense_intermediate_size or spec.intermediate_size,
                      shared_expert_intermediate_size=spec.shared_width, attention_bias=spec.qkv_bias,
                      partial_rotary_factor=spec.rotary_dim / spec.head_dim,
                      layer_types=["linear_attention" if spec.linear_layer(i) else "full_attention"
                                   for i in range(spec.num_layers)],
                      linear_num_key_heads=spec.linear_key_heads,
                      linear_num_value_heads=spec.linear_value_heads,
                      linear_key_head_dim=spec.linear_key_head_dim,
                      linear_value_head_dim=spec.linear_value_head_dim,
                      linear_conv_kernel_dim=spec.linear_conv_kernel)
    if spec.family == "qwen3_moe" and spec.sliding_window is not None:
        config.update(use_sliding_window=True, sliding_window=spec.sliding_window)
    if spec.family == "gpt_oss":
        # its attention biases are all or none; its router and experts always have them
        config.update(attention_bias=spec.out_bias, num_local_experts=spec.num_experts,
                      num_experts_per_tok=spec.experts_per_token, sliding_window=spec.sliding_window,
                      layer_types=["sliding_attention" if spec.sliding_type(i) else "full_attention"
                                   for i in range(spec.num_layers)])
    if spec.family == "smollm3":
        config["no_rope_layers"] = [int(spec.rotary_layer(i)) for i in range(spec.num_layers)]
        if spec.sliding_window is not None:
            config.update(use_sliding_window=True, sliding_window=spec.sliding_window)
    if spec.family in ("mistral", "mixtral", "phi3") or (spec.family == "gemma2" and spec.sliding_window):
        config["sliding_window"] = spec.sliding_window
    if spec.family in QWEN_WINDOWS and spec.sliding_window is not None:
        config.update(use_sliding_window=True, sliding_window=spec.sliding_window,
                      max_window_layers=spec.max_window_layers)
    if spec.kv_lora_rank:
        config.update(_latent_config(spec), **_shared_expert_config(spec))
    if spec.family == "llama4":
        config.update(_llama4_config(spec))
    if spec.family == "glm4_moe":
        config.update(partial_rotary_factor=spec.rotary_dim / spec.head_dim, use_qk_norm=bool(spec.qk_norm),
                      **_shared_expert_config(spec))
    return config


def _llama4_config(spec: ModelSpec) -> dict:
    """The Llama 4 keys of `to_hf_config`."""
    return {
        "attention_bias": spec.out_bias, "num_local_experts": spec.num_experts,
        "num_experts_per_tok": spec.experts_per_token,
        "moe_layers": [i for i in range(spec.num_layers) if spec.sparse_layer(i)],
        "intermediate_size_mlp": spec.dense_intermediate_size or spec.intermediate_size,
        "no_rope_layers": [int(spec.rotary_layer(i)) for i in range(spec.num_layers)],
        "use_qk_norm": spec.qk_norm == "l2", "attention_chunk_size": spec.attention_chunk,
        "attn_temperature_tuning": spec.nope_temperature,
    }


def _latent_config(spec: ModelSpec) -> dict:
    """The DeepSeek-V3 keys of `to_hf_config` for latent attention."""
    return {
        "q_lora_rank": spec.q_lora_rank or None, "kv_lora_rank": spec.kv_lora_rank,
        "qk_nope_head_dim": spec.head_dim - spec.rotary_dim, "qk_rope_head_dim": spec.rotary_dim,
        "v_head_dim": spec.value_head_dim, "rope_interleave": spec.rope_interleave,
        "head_dim": spec.rotary_dim,  # as DeepseekV3Config sets it: the rotary embedding's width
    }


def _shared_expert_config(spec: ModelSpec) -> dict:
    """The expert-block keys of `to_hf_config` DeepSeek-V3 and GLM-4-MoE share."""
    return {
        "n_routed_experts": spec.num_experts, "num_experts_per_tok": spec.experts_per_token,
        "moe_intermediate_size": spec.intermediate_size,
        # a model without dense layers never reads `intermediate_size`: any width builds it
        "intermediate_size": spec.dense_intermediate_size or spec.intermediate_size,
        "first_k_dense_replace": len(spec.dense_layers), "n_shared_experts": spec.shared_experts,
        "n_group": spec.expert_groups, "topk_group": spec.topk_groups,
        "routed_scaling_factor": spec.routed_scaling, "norm_topk_prob": spec.norm_topk,
        "attention_bias": spec.qkv_bias,
    }
