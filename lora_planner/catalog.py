"""Named models, with the values their published Hugging Face `config.json` files state.

Each entry's `source` names the config it copies. Tests build every entry with transformers on the
meta device and compare the parameter count to the parameter.
"""

from __future__ import annotations

from dataclasses import replace

from .errors import PlanError
from .spec import ModelSpec


def _gpt2(name: str, hidden: int, layers: int, heads: int, source: str, aliases=()) -> ModelSpec:
    return ModelSpec(
        name=name, family="gpt2", vocab_size=50257, hidden_size=hidden, num_layers=layers,
        num_heads=heads, num_kv_heads=heads, head_dim=hidden // heads,
        intermediate_size=4 * hidden, tied_embeddings=True, max_positions=1024,
        qkv_bias=True, out_bias=True, mlp_bias=True, aliases=tuple(aliases), source=source,
    )


def _decoder(name: str, family: str, *, vocab: int, hidden: int, layers: int, heads: int,
             kv_heads: int, inner: int, tied: bool, positions: int, head_dim: int | None = None,
             experts: int = 0, experts_per_token: int = 0, source: str,
             aliases=(), sliding_window: int | None = None, norm_topk: bool = True,
             nope_layers: tuple[int, ...] = (), global_layers: tuple[int, ...] = ()) -> ModelSpec:
    return ModelSpec(
        name=name, family=family, vocab_size=vocab, hidden_size=hidden, num_layers=layers,
        num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim or hidden // heads,
        intermediate_size=inner, tied_embeddings=tied, max_positions=positions,
        qkv_bias=family == "qwen2", num_experts=experts, experts_per_token=experts_per_token,
        aliases=tuple(aliases), source=source, sliding_window=sliding_window, norm_topk=norm_topk,
        nope_layers=nope_layers, global_layers=global_layers,
    )


def _gemma3(name: str, *, vocab: int, hidden: int, layers: int, heads: int, kv_heads: int, head_dim: int,
            inner: int, positions: int, window: int, source: str) -> ModelSpec:
    """A Gemma 3 text tower: tied embeddings, every sixth layer global (sliding_window_pattern 6), no
    soft-caps (the published configs state none)."""
    spec = _decoder(name, "gemma3", vocab=vocab, hidden=hidden, layers=layers, heads=heads,
                    kv_heads=kv_heads, inner=inner, tied=True, positions=positions, head_dim=head_dim,
                    sliding_window=window, global_layers=tuple(range(5, layers, 6)), source=source)
    return replace(spec, attn_softcap=False, final_softcap=False)


def _gpt_oss(name: str, *, layers: int, experts: int, source: str) -> ModelSpec:
    """A GPT-OSS model: hidden 2,880, 64 query heads of 64 over 8 k/v heads, biases on every
    projection, the router and the experts, attention sinks, a 128-token window on the even layers
    (layer_types alternate, sliding first), experts 2,880 wide, 4 per token, vocabulary 201,088."""
    spec = _decoder(name, "gpt_oss", vocab=201088, hidden=2880, layers=layers, heads=64, kv_heads=8,
                    inner=2880, tied=False, positions=131072, head_dim=64, experts=experts,
                    experts_per_token=4, sliding_window=128, global_layers=tuple(range(1, layers, 2)),
                    norm_topk=False, source=source)
    return replace(spec, qkv_bias=True, out_bias=True, mlp_bias=True, attention_sinks=True)


CATALOG: tuple[ModelSpec, ...] = (
    _gpt2("gpt2", 768, 12, 12, "openai-community/gpt2", aliases=("gpt2-small",)),
    _gpt2("gpt2-medium", 1024, 24, 16, "openai-community/gpt2-medium"),
    _gpt2("gpt2-large", 1280, 36, 20, "openai-community/gpt2-large"),
    _gpt2("gpt2-xl", 1600, 48, 25, "openai-community/gpt2-xl"),
    _decoder("llama-3.2-1b", "llama", vocab=128256, hidden=2048, layers=16, heads=32, kv_heads=8,
             inner=8192, tied=True, positions=131072, head_dim=64,
             source="meta-llama/Llama-3.2-1B", aliases=("1b",)),
    _decoder("llama-3.2-3b", "llama", vocab=128256, hidden=3072, layers=28, heads=24, kv_heads=8,
             inner=8192, tied=True, positions=131072, head_dim=128,
             source="meta-llama/Llama-3.2-3B", aliases=("3b",)),
    _decoder("llama-3.1-8b", "llama", vocab=128256, hidden=4096, layers=32, heads=32, kv_heads=8,
             inner=14336, tied=False, positions=131072,
             source="meta-llama/Llama-3.1-8B", aliases=("8b",)),
    _decoder("llama-3.1-70b", "llama", vocab=128256, hidden=8192, layers=80, heads=64, kv_heads=8,
             inner=28672, tied=False, positions=131072,
             source="meta-llama/Llama-3.1-70B", aliases=("70b",)),
    _decoder("llama-3.1-405b", "llama", vocab=128256, hidden=16384, layers=126, heads=128,
             kv_heads=8, inner=53248, tied=False, positions=131072,
             source="meta-llama/Llama-3.1-405B", aliases=("405b",)),
    _decoder("llama-2-7b", "llama", vocab=32000, hidden=4096, layers=32, heads=32, kv_heads=32,
             inner=11008, tied=False, positions=4096, source="meta-llama/Llama-2-7b-hf",
             aliases=("7b",)),
    _decoder("llama-2-13b", "llama", vocab=32000, hidden=5120, layers=40, heads=40, kv_heads=40,
             inner=13824, tied=False, positions=4096, source="meta-llama/Llama-2-13b-hf",
             aliases=("13b",)),
    _decoder("llama-2-70b", "llama", vocab=32000, hidden=8192, layers=80, heads=64, kv_heads=8,
             inner=28672, tied=False, positions=4096, source="meta-llama/Llama-2-70b-hf"),
    _decoder("mistral-7b", "mistral", vocab=32000, hidden=4096, layers=32, heads=32, kv_heads=8,
             inner=14336, tied=False, positions=32768, source="mistralai/Mistral-7B-v0.1"),
    _decoder("mixtral-8x7b", "mixtral", vocab=32000, hidden=4096, layers=32, heads=32, kv_heads=8,
             inner=14336, tied=False, positions=32768, experts=8, experts_per_token=2,
             source="mistralai/Mixtral-8x7B-v0.1"),
    _decoder("qwen2.5-0.5b", "qwen2", vocab=151936, hidden=896, layers=24, heads=14, kv_heads=2,
             inner=4864, tied=True, positions=32768, source="Qwen/Qwen2.5-0.5B"),
    _decoder("qwen2.5-7b", "qwen2", vocab=152064, hidden=3584, layers=28, heads=28, kv_heads=4,
             inner=18944, tied=False, positions=131072, source="Qwen/Qwen2.5-7B"),
    _decoder("qwen2.5-72b", "qwen2", vocab=152064, hidden=8192, layers=80, heads=64, kv_heads=8,
             inner=29568, tied=False, positions=131072, source="Qwen/Qwen2.5-72B"),
    _decoder("gemma-2-2b", "gemma2", vocab=256000, hidden=2304, layers=26, heads=8, kv_heads=4,
             inner=9216, tied=True, positions=8192, head_dim=256, source="google/gemma-2-2b",
             sliding_window=4096),
    _decoder("gemma-2-9b", "gemma2", vocab=256000, hidden=3584, layers=42, heads=16, kv_heads=8,
             inner=14336, tied=True, positions=8192, head_dim=256, source="google/gemma-2-9b",
             sliding_window=4096),
    _decoder("gemma-2-27b", "gemma2", vocab=256000, hidden=4608, layers=46, heads=32,
             kv_heads=16, inner=36864, tied=True, positions=8192, head_dim=128,
             source="google/gemma-2-27b", sliding_window=4096),
    _decoder("phi-3-mini", "phi3", vocab=32064, hidden=3072, layers=32, heads=32, kv_heads=32,
             inner=8192, tied=False, positions=4096, source="microsoft/Phi-3-mini-4k-instruct"),
    _decoder("llama-3.3-70b", "llama", vocab=128256, hidden=8192, layers=80, heads=64, kv_heads=8,
             inner=28672, tied=False, positions=131072, source="meta-llama/Llama-3.3-70B-Instruct"),
    # the language model of Mistral Small 3.1 (its config's `text_config`; the vision tower is not
    # planned): a Mistral decoder without a sliding window
    _decoder("mistral-small-3.1-24b", "mistral", vocab=131072, hidden=5120, layers=40, heads=32,
             kv_heads=8, inner=32768, tied=False, positions=131072, head_dim=128,
             source="mistralai/Mistral-Small-3.1-24B-Base-2503"),
    _decoder("phi-4", "phi3", vocab=100352, hidden=5120, layers=40, heads=40, kv_heads=10,
             inner=17920, tied=False, positions=16384, source="microsoft/phi-4"),
    _decoder("qwen3-0.6b", "qwen3", vocab=151936, hidden=1024, layers=28, heads=16, kv_heads=8,
             inner=3072, tied=True, positions=40960, head_dim=128, source="Qwen/Qwen3-0.6B"),
    _decoder("qwen3-8b", "qwen3", vocab=151936, hidden=4096, layers=36, heads=32, kv_heads=8,
             inner=12288, tied=False, positions=40960, head_dim=128, source="Qwen/Qwen3-8B"),
    _decoder("qwen3-32b", "qwen3", vocab=151936, hidden=5120, layers=64, heads=64, kv_heads=8,
             inner=25600, tied=False, positions=40960, head_dim=128, source="Qwen/Qwen3-32B"),
    # `inner` is the experts' width (moe_intermediate_size): every layer is sparse
    _decoder("qwen3-30b-a3b", "qwen3_moe", vocab=151936, hidden=2048, layers=48, heads=32, kv_heads=4,
             inner=768, tied=False, positions=40960, head_dim=128, experts=128, experts_per_token=8,
             source="Qwen/Qwen3-30B-A3B"),
    _decoder("qwen3-235b-a22b", "qwen3_moe", vocab=151936, hidden=4096, layers=94, heads=64,
             kv_heads=4, inner=1536, tied=False, positions=40960, head_dim=128, experts=128,
             experts_per_token=8, source="Qwen/Qwen3-235B-A22B"),
    _decoder("olmo-2-7b", "olmo2", vocab=100352, hidden=4096, layers=32, heads=32, kv_heads=32,
             inner=11008, tied=False, positions=4096, source="allenai/OLMo-2-1124-7B"),
    # every fourth layer without rotary embeddings (NoPE): layers 3, 7, ..., 35
    _decoder("smollm3-3b", "smollm3", vocab=128256, hidden=2048, layers=36, heads=16, kv_heads=4,
             inner=11008, tied=True, positions=65536, nope_layers=tuple(range(3, 36, 4)),
             source="HuggingFaceTB/SmolLM3-3B"),
    # Gemma 3: 1B is text only; 4B, 12B and 27B are the language models of the multimodal checkpoints
    # (their config's `text_config`; the vision tower is not planned)
    _gemma3("gemma-3-1b", vocab=262144, hidden=1152, layers=26, heads=4, kv_heads=1, head_dim=256,
            inner=6912, positions=32768, window=512, source="google/gemma-3-1b-pt"),
    _gemma3("gemma-3-4b", vocab=262208, hidden=2560, layers=34, heads=8, kv_heads=4, head_dim=256,
            inner=10240, positions=131072, window=1024, source="google/gemma-3-4b-pt"),
    _gemma3("gemma-3-12b", vocab=262208, hidden=3840, layers=48, heads=16, kv_heads=8, head_dim=256,
            inner=15360, positions=131072, window=1024, source="google/gemma-3-12b-pt"),
    _gemma3("gemma-3-27b", vocab=262208, hidden=5376, layers=62, heads=32, kv_heads=16, head_dim=128,
            inner=21504, positions=131072, window=1024, source="google/gemma-3-27b-pt"),
    # OpenAI's open-weight MoE models; their published checkpoints store the experts in MXFP4, which
    # transformers dequantises to 16 bits for training (`integrations/mxfp4.py`)
    _gpt_oss("gpt-oss-20b", layers=24, experts=32, source="openai/gpt-oss-20b"),
    _gpt_oss("gpt-oss-120b", layers=36, experts=128, source="openai/gpt-oss-120b"),
)

# DeepSeek-V3 as transformers builds it: latent attention (q through a 1,536 bottleneck, k and v from a
# 512 latent, 64 of each 192-wide q/k head rotating, interleaved), 3 dense layers then 58 of 256 routed
# experts (top 8, within the best 4 of 8 groups) beside one shared expert. The multi-token-prediction
# layer of the checkpoint (`model.layers.61`) is not built, so not planned.
DEEPSEEK_V3 = ModelSpec(
    name="deepseek-v3", family="deepseek_v3", vocab_size=129280, hidden_size=7168, num_layers=61,
    num_heads=128, num_kv_heads=128, head_dim=128 + 64, intermediate_size=2048, tied_embeddings=False,
    max_positions=163840, num_experts=256, experts_per_token=8, source="deepseek-ai/DeepSeek-V3",
    kv_lora_rank=512, q_lora_rank=1536, rope_head_dim=64, v_head_dim=128, rope_interleave=True,
    dense_layers=(0, 1, 2), dense_intermediate_size=18432, shared_experts=1, expert_groups=8, topk_groups=4,
    routed_scaling=2.5,
)

# GLM-4.5-Air: 1 dense layer then 45 of 128 routed experts (top 8) beside one shared expert, half of
# each 128-wide head rotating, biases on q/k/v, no q/k norms (use_qk_norm false). 106.85B parameters
# as transformers builds it; the multi-token-prediction layer of the checkpoint is not built.
GLM_4_5_AIR = ModelSpec(
    name="glm-4.5-air", family="glm4_moe", vocab_size=151552, hidden_size=4096, num_layers=46,
    num_heads=96, num_kv_heads=8, head_dim=128, intermediate_size=1408, tied_embeddings=False,
    max_positions=131072, qkv_bias=True, num_experts=128, experts_per_token=8,
    source="zai-org/GLM-4.5-Air", rope_head_dim=64, dense_layers=(0,), dense_intermediate_size=10944,
    shared_experts=1,
)

# Qwen3-Next-80B-A3B: 48 layers, every fourth full attention (16 query heads of 256, 2 k/v heads, an
# output gate, a quarter of each head rotating), the other 36 gated-DeltaNet linear attention (16 q/k
# heads and 32 value heads of 128, a 4-token convolution); every layer 512 routed experts 512 wide, top
# 10, beside one gated shared expert as wide. 79.67B parameters as transformers builds it (the
# checkpoint's multi-token-prediction layer, `mtp.*`, is not built).
QWEN3_NEXT_80B = ModelSpec(
    name="qwen3-next-80b-a3b", family="qwen3_next", vocab_size=151936, hidden_size=2048, num_layers=48,
    num_heads=16, num_kv_heads=2, head_dim=256, intermediate_size=512, tied_embeddings=False,
    max_positions=262144, num_experts=512, experts_per_token=10, source="Qwen/Qwen3-Next-80B-A3B-Instruct",
    rope_head_dim=64, shared_experts=1, shared_expert_width=512, shared_expert_gate=True,
    attention_output_gate=True, linear_layers=tuple(i for i in range(48) if (i + 1) % 4),
    linear_key_heads=16, linear_value_heads=32, linear_key_head_dim=128, linear_value_head_dim=128,
    linear_conv_kernel=4,
)


def _llama4(name: str, *, experts: int, every: int, qk_norm: bool, positions: int, source: str) -> ModelSpec:
    """A Llama 4 language model as `Llama4ForCausalLM` builds it from the checkpoint's text_config:
    hidden 5,120, 48 layers, 40 query heads of 128 over 8 k/v heads, vocabulary 202,048, untied; one
    expert per token, experts and the shared expert 8,192 wide, every `every`-th layer sparse (the
    others dense, 16,384 wide); every fourth layer NoPE (no_rope_layers' default), the rotary ones
    attending in 8,192-token chunks, the NoPE ones with temperature tuning."""
    moe = tuple(range(every - 1, 48, every))
    dense = tuple(i for i in range(48) if i not in moe)
    return ModelSpec(
        name=name, family="llama4", vocab_size=202048, hidden_size=5120, num_layers=48, num_heads=40,
        num_kv_heads=8, head_dim=128, intermediate_size=8192, tied_embeddings=False, max_positions=positions,
        num_experts=experts, experts_per_token=1, norm_topk=False, source=source,
        dense_layers=dense, dense_intermediate_size=16384 if dense else 0, shared_experts=1,
        nope_layers=tuple(range(3, 48, 4)), qk_norm="l2" if qk_norm else None, attention_chunk=8192,
        nope_temperature=True,
    )


# Llama 4 Scout: 16 experts in every layer, q/k norms on; 107.77B parameters in its language model
# (the published 109B counts the vision tower too, which is not planned). Maverick: 128 experts in
# every other layer (odd ones; interleave_moe_layer_step 2), no q/k norms (transformers' modules say
# both of "the 128E model"); 400.71B in its language model.
LLAMA_4_SCOUT = _llama4("llama-4-scout", experts=16, every=1, qk_norm=True, positions=10485760,
                        source="meta-llama/Llama-4-Scout-17B-16E")
LLAMA_4_MAVERICK = _llama4("llama-4-maverick", experts=128, every=2, qk_norm=False, positions=1048576,
                           source="meta-llama/Llama-4-Maverick-17B-128E")

CATALOG += (DEEPSEEK_V3, GLM_4_5_AIR, QWEN3_NEXT_80B, LLAMA_4_SCOUT, LLAMA_4_MAVERICK)

# What a plan of an entry says about its published checkpoint, by hub id, where the plan's 16-bit base
# is not what the hub holds
_LLAMA4_NOTE = ("{id} is a multimodal checkpoint (Llama4ForConditionalGeneration): its language model "
                "is planned, the vision tower and projector are not. The shape is its text_config as "
                "recalled, not read from the hub (max_position_embeddings least sure; it changes no "
                "planned byte); the parameter count is held to a meta-device build")
PUBLISHED_NOTES = {
    **{spec.source: _LLAMA4_NOTE.format(id=spec.source) for spec in (LLAMA_4_SCOUT, LLAMA_4_MAVERICK)},
    "deepseek-ai/DeepSeek-V3": (
        "deepseek-ai/DeepSeek-V3 is published in FP8 (block-scaled e4m3 weights; 685B parameters with "
        "its multi-token-prediction module, which transformers does not build): this plan assumes a "
        "16-bit base, as after dequantising the checkpoint to bf16"),
}

_BY_NAME = {alias: spec for spec in CATALOG for alias in (spec.name, *spec.aliases)}
# The hub id each entry copies (`meta-llama/Llama-3.1-8B`), so it is answered without the network.
_BY_SOURCE = {spec.source.lower(): spec for spec in CATALOG if spec.source}


def lookup(name: str) -> ModelSpec | None:
    """A catalog entry by name, alias or the hub id it copies (any case); None when there is none."""
    key = name.strip().lower()
    return _BY_NAME.get(key) or _BY_SOURCE.get(key)


def get_model(name: str) -> ModelSpec:
    """A catalog entry by name or alias; a `PlanError` with close names when there is none."""
    spec = lookup(name)
    if spec is not None:
        return spec
    import difflib  # only an unknown name needs it

    close = difflib.get_close_matches(name.strip().lower(), _BY_NAME, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise PlanError(f"unknown model {name!r}{hint} (see `lora-plan models`)")
