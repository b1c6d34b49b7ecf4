"""Differential fuzzing: random small architectures, planned from their config.json, against a trace.

Each seed gives one case: a Hugging Face config dict for one of the families we lay out (1-4
layers, odd widths, grouped- and multi-query attention, head_dim unlike hidden / heads, tied and
untied embeddings, biases, sliding windows, soft-caps, dropout, mixtures of experts with top-k),
and a training setup (full or LoRA with random targets and rank, fp32 / amp / pure-bf16, eager or
SDPA, checkpointing, batch, odd sequence lengths, a `--layers` slice). The planner reads the config
as a user's config.json (`spec_from_hf_config`); the trace builds the model from the same dict with
transformers, so the two sides share nothing but the file.

The generator and one case's run live here, in the package, so the tests and the scripts
(`benchmarks/fuzz_models.py`, which runs ranges of seeds and writes the records) import the same
code. Drawing a case needs no torch; running one needs the `measure` extra.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

from ..activations import cpu_rng_state_bytes
from ..counts import LINEAR_ROUTERS
from ..spec import FAMILY_MODEL_TYPE, MOE_FAMILIES, TrainSetup, spec_from_hf_config
from ..timeline import Phase

TARGET_PRESETS = ("default", "qv", "attn", "mlp", "all-linear")


@dataclass(frozen=True)
class Case:
    seed: int
    config: dict  # the config.json, whole model
    setup: TrainSetup
    layers: int | None  # a --layers slice, or None for the whole model
    fake: bool

    @property
    def label(self) -> str:
        c, s = self.config, self.setup
        return (f"seed={self.seed} {c['model_type']} L={self.layers or 'all'} {s.method}"
                f"{'' if s.method == 'full' else f' r={s.rank} {s.targets[0]}'} {s.precision} "
                f"b={s.batch_size} s={s.seq_len} {s.attention}{' ckpt' if s.grad_checkpointing else ''}"
                f"{' fake' if self.fake else ''}")

    def build_config(self) -> dict:
        """The config transformers builds: the whole config, cut to the slice's layers."""
        key = "n_layer" if self.config["model_type"] == "gpt2" else "num_hidden_layers"
        if self.layers is None:
            return dict(self.config)
        kept = min(self.layers, self.config[key])
        # (Llama 4 derives its layer types from every no_rope_layers flag, not num_hidden_layers')
        cut = {key: self.config[key][:kept] for key in ("layer_types", "no_rope_layers")
               if isinstance(self.config.get(key), list)}
        return {**self.config, key: kept, **cut}


def _heads(rng: random.Random) -> tuple[int, int]:
    """(heads, kv heads): multi-head, grouped-query or multi-query."""
    kv = rng.choice((1, 1, 2, 3))
    group = rng.choice((1, 2, 3, 4))
    return kv * group, kv


def random_config(rng: random.Random, family: str) -> dict:
    """A small config.json of `family`, drawn from the shapes and options the family allows."""
    layers = rng.randint(1, 4)
    vocab = rng.randint(40, 400)
    positions = 128
    if family == "gpt2":
        heads = rng.randint(1, 4)
        hidden = heads * rng.randint(3, 12)  # any head size: GPT-2 has no rotary
        config = {"model_type": "gpt2", "vocab_size": vocab, "n_embd": hidden, "n_layer": layers,
                  "n_head": heads, "n_positions": positions,
                  "tie_word_embeddings": rng.random() < 0.7}
        if rng.random() < 0.5:
            config["n_inner"] = rng.randint(8, 160)
        for key in ("attn_pdrop", "resid_pdrop", "embd_pdrop"):
            r = rng.random()
            if r < 0.5:
                config[key] = rng.choice((0.0, 0.1, 0.25))  # else left out: the class default 0.1
        return config
    heads, kv = _heads(rng)
    head_dim = 2 * rng.randint(2, 8)  # rotary needs an even head size
    if family == "phi3":
        hidden = heads * head_dim  # Phi-3 derives head_dim from hidden / heads
    elif family in ("mixtral", "qwen3_moe", "gpt_oss", "deepseek_v3", "glm4_moe", "qwen3_next",
                    "llama4"):
        # torch's grouped matmul wants 16-byte strides: widths a multiple of 8
        hidden = heads * 8 * rng.randint(1, 3)
    else:
        # transformers wants hidden a multiple of heads, even with its own head_dim
        hidden = heads * rng.randint(2, 13)
    config = {
        "model_type": FAMILY_MODEL_TYPE.get(family, family), "vocab_size": vocab, "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv,
        "intermediate_size": rng.randint(1, 16) * 8 if family in ("mixtral", "qwen3_moe", "gpt_oss",
                                                                   "deepseek_v3", "glm4_moe", "qwen3_next",
                                                                   "llama4")
        else rng.randint(8, 130),
        "max_position_embeddings": positions,
        "tie_word_embeddings": rng.random() < 0.5,
        "pad_token_id": None, "bos_token_id": None, "eos_token_id": None,
    }
    if family != "phi3":
        config["head_dim"] = head_dim
    if rng.random() < 0.3:
        config["attention_dropout"] = rng.choice((0.0, 0.1))
    if family in ("llama", "qwen3", "qwen3_moe", "olmo2", "smollm3", "gemma3", "qwen3_next"):
        config["attention_bias"] = rng.random() < 0.3
    if family in ("llama", "smollm3"):
        config["mlp_bias"] = rng.random() < 0.3
    if family == "smollm3":
        # NoPE layers: a list of rope flags, or every n-th layer; a sliding window on them
        if rng.random() < 0.5:
            config["no_rope_layers"] = [rng.randint(0, 1) for _ in range(layers)]
        else:
            config["no_rope_layer_interval"] = rng.randint(1, 4)
        if rng.random() < 0.3:
            config.update(use_sliding_window=True, sliding_window=rng.randint(2, 80))
    if family in ("mistral", "mixtral", "gemma2"):
        config["sliding_window"] = rng.choice((None, rng.randint(2, 80))) if family != "gemma2" \
            else rng.randint(2, 80)
    if family in ("qwen2", "qwen3") and rng.random() < 0.5:
        config.update(use_sliding_window=True, sliding_window=rng.randint(2, 80),
                      max_window_layers=rng.randint(0, layers))
    if family == "gemma2":
        config["attn_logit_softcapping"] = rng.choice((None, 50.0))
        config["final_logit_softcapping"] = rng.choice((None, 30.0))
    if family == "gemma3":
        # every n-th layer global (the published 6 leaves 1-4 layers all sliding, as 4 or more can),
        # or a list of layer types; soft-caps off, as the class has them
        if rng.random() < 0.5:
            config["sliding_window_pattern"] = rng.randint(1, 4)
        else:
            config["layer_types"] = [rng.choice(("sliding_attention", "full_attention"))
                                     for _ in range(layers)]
        config["sliding_window"] = rng.randint(2, 80)
        config["query_pre_attn_scalar"] = rng.choice((head_dim, rng.randint(8, 300)))
        config["final_logit_softcapping"] = rng.choice((None, None, 30.0))
    if family == "phi3" and rng.random() < 0.4:
        config["resid_pdrop"] = rng.choice((0.0, 0.1))
    if family == "deepseek_v3":
        config.update(_latent_config(rng, heads, layers, config["intermediate_size"]))
    if family == "glm4_moe":
        config.update(_glm4_moe_config(rng, layers, config["intermediate_size"]))
    if family == "llama4":
        config.update(_llama4_config(rng, layers))
    if family == "mixtral":
        experts = rng.randint(2, 5)
        config.update(num_local_experts=experts, num_experts_per_tok=rng.randint(1, min(3, experts)))
    if family == "qwen3_moe":
        experts = rng.randint(2, 5)
        # the experts' width is moe_intermediate_size, the dense layers' intermediate_size
        config.update(num_experts=experts, num_experts_per_tok=rng.randint(1, min(3, experts)),
                      moe_intermediate_size=config["intermediate_size"],
                      norm_topk_prob=rng.random() < 0.5)
        if rng.random() < 0.3:
            config.update(use_sliding_window=True, sliding_window=rng.randint(2, 80))
        if rng.random() < 0.3:  # dense layers among the sparse ones, listed or every step-th sparse
            config["intermediate_size"] = rng.randint(1, 16) * 8
            if rng.random() < 0.5:
                config["mlp_only_layers"] = sorted(rng.sample(range(layers), rng.randint(1, layers)))
            else:
                config["decoder_sparse_step"] = rng.randint(2, 3)
    if family == "qwen3_next":
        config.update(_qwen3_next_config(rng, layers, head_dim, config["intermediate_size"]))
    if family == "gpt_oss":
        experts = rng.randint(2, 5)
        # biases on all four projections or none; sliding and full layers in any order
        config.update(num_local_experts=experts, num_experts_per_tok=rng.randint(1, min(3, experts)),
                      attention_bias=rng.random() < 0.7, sliding_window=rng.randint(2, 80),
                      layer_types=[rng.choice(("sliding_attention", "full_attention"))
                                   for _ in range(layers)])
    return config


def _qwen3_next_config(rng: random.Random, layers: int, head_dim: int, expert_width: int) -> dict:
    """Qwen3-Next's keys: linear and full layers in any order (a list, or every n-th full), the
    gated-DeltaNet's heads (value heads a multiple of key heads) and widths, a convolution of 1-4
    tokens, a partial rotary factor, a shared expert of its own width, and dense layers as Qwen3-MoE
    draws them."""
    experts, k_heads = rng.randint(2, 5), rng.randint(1, 3)
    config = {"num_experts": experts, "num_experts_per_tok": rng.randint(1, min(3, experts)),
              "moe_intermediate_size": expert_width, "norm_topk_prob": rng.random() < 0.5,
              "shared_expert_intermediate_size": rng.randint(1, 16) * 8,
              "linear_num_key_heads": k_heads, "linear_num_value_heads": k_heads * rng.randint(1, 3),
              "linear_key_head_dim": 2 * rng.randint(1, 8), "linear_value_head_dim": 2 * rng.randint(1, 8),
              "linear_conv_kernel_dim": rng.randint(1, 4),
              "partial_rotary_factor": rng.choice((0.25, 0.5, 1.0)) if head_dim % 8 == 0 else 1.0}
    if rng.random() < 0.5:
        config["layer_types"] = [rng.choice(("linear_attention", "full_attention")) for _ in range(layers)]
    else:
        config["full_attention_interval"] = rng.randint(1, 4)
    if rng.random() < 0.3:  # dense layers among the sparse ones
        config["intermediate_size"] = rng.randint(1, 16) * 8
        if rng.random() < 0.5:
            config["mlp_only_layers"] = sorted(rng.sample(range(layers), rng.randint(1, layers)))
        else:
            config["decoder_sparse_step"] = rng.randint(2, 3)
    return config


def _latent_config(rng: random.Random, heads: int, layers: int, expert_width: int) -> dict:
    """DeepSeek-V3's keys: latent attention (a key and value per head, the query through a bottleneck
    or not, interleaved rotary pairs or halves), 0 to all layers dense first, one or two shared
    experts, experts in one or two groups (each of two or three), the router's top-k within the best
    groups, normalised or not."""
    groups = rng.randint(1, 2)
    experts = groups * rng.randint(2, 3)
    topk_groups = rng.randint(1, groups)
    rope = 2 * rng.randint(1, 4)
    return {
        "head_dim": rope,  # DeepseekV3Config's: the rotary part of a head
        "num_key_value_heads": heads,
        "q_lora_rank": rng.choice((None, rng.randint(2, 24))), "kv_lora_rank": rng.randint(2, 24),
        "qk_nope_head_dim": rng.randint(1, 10), "qk_rope_head_dim": rope,
        "v_head_dim": rng.randint(1, 10), "rope_interleave": rng.random() < 0.5,
        "attention_bias": rng.random() < 0.3,
        "moe_intermediate_size": expert_width, "intermediate_size": rng.randint(8, 130),
        "first_k_dense_replace": rng.randint(0, layers), "n_shared_experts": rng.randint(1, 2),
        "n_routed_experts": experts, "n_group": groups, "topk_group": topk_groups,
        "num_experts_per_tok": rng.randint(1, min(3, topk_groups * experts // groups)),
        "norm_topk_prob": rng.random() < 0.5, "routed_scaling_factor": rng.choice((1.0, 2.5)),
    }


def _glm4_moe_config(rng: random.Random, layers: int, expert_width: int) -> dict:
    """GLM-4-MoE's keys: a partial rotary embedding (half of each head, or all of it), q/k norms or
    none, biases on q/k/v or none, and DeepSeek-V3's expert block (dense layers first, shared
    experts, grouped sigmoid routing)."""
    groups = rng.randint(1, 2)
    experts = groups * rng.randint(2, 3)
    topk_groups = rng.randint(1, groups)
    return {
        "head_dim": 4 * rng.randint(1, 4), "partial_rotary_factor": rng.choice((0.5, 0.5, 1.0)),
        "use_qk_norm": rng.random() < 0.5, "attention_bias": rng.random() < 0.5,
        "moe_intermediate_size": expert_width, "intermediate_size": rng.randint(8, 130),
        "first_k_dense_replace": rng.randint(0, layers), "n_shared_experts": rng.randint(1, 2),
        "n_routed_experts": experts, "n_group": groups, "topk_group": topk_groups,
        "num_experts_per_tok": rng.randint(1, min(3, topk_groups * experts // groups)),
        "norm_topk_prob": rng.random() < 0.5, "routed_scaling_factor": rng.choice((1.0, 2.5)),
    }


def _llama4_config(rng: random.Random, layers: int) -> dict:
    """Llama 4's keys: 2-5 experts, top 1-3; sparse layers listed or every step-th (the rest dense, of
    their own width); NoPE layers listed or every n-th; chunked rotary layers or none; the weightless
    q/k norm and the NoPE layers' temperature on or off; biases on the attention or none."""
    experts = rng.randint(2, 5)
    config = {"num_local_experts": experts, "num_experts_per_tok": rng.randint(1, min(3, experts)),
              "intermediate_size_mlp": rng.randint(1, 16) * 8, "use_qk_norm": rng.random() < 0.5,
              "attention_chunk_size": rng.choice((None, rng.randint(2, 40))),
              "attn_temperature_tuning": rng.random() < 0.7, "floor_scale": rng.randint(1, 8),
              "attention_bias": rng.random() < 0.3}
    if rng.random() < 0.5:
        config["moe_layers"] = sorted(rng.sample(range(layers), rng.randint(0, layers)))
    else:
        config["interleave_moe_layer_step"] = rng.randint(1, 2)
    if rng.random() < 0.5:
        config["no_rope_layers"] = [rng.randint(0, 1) for _ in range(layers)]
    else:
        config["no_rope_layer_interval"] = rng.randint(1, 4)
    return config


# every linear layer but a router that is one (`counts.LINEAR_ROUTERS`): all-linear, as drawn for Llama 4
LINEAR_ROUTER_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# The families seeds cycle through, in this order. A family added later is drawn by name
# (`random_case(seed, family)`), so every recorded seed keeps its case.
SEEDED_FAMILIES = ("gpt2", "llama", "mistral", "mixtral", "qwen2", "gemma2", "phi3")


def random_case(seed: int, family: str | None = None) -> Case:
    """Seed `seed`'s case: of `family`, or of the seed's place in `SEEDED_FAMILIES` (every family
    equally often)."""
    rng = random.Random(seed)
    family = family or SEEDED_FAMILIES[seed % len(SEEDED_FAMILIES)]
    config = random_config(rng, family)
    spec = spec_from_hf_config(config, name=f"fuzz-{seed}")
    layers = rng.randint(1, spec.num_layers) if spec.num_layers > 1 and rng.random() < 0.3 else None
    method = rng.choice(("full", "lora", "lora"))
    # GPT-OSS's attention is eager only in transformers (no SDPA path takes its sinks)
    attention = "eager" if family in ("gemma2", "gpt_oss") else rng.choice(("sdpa", "eager"))
    setup = TrainSetup(
        method=method, rank=rng.randint(1, 8),
        # Mixtral's mlp and all-linear reach its fused experts (PEFT's target_parameters)
        targets=(rng.choice(TARGET_PRESETS),),
        precision=rng.choice(("fp32", "amp", "pure-bf16")), batch_size=rng.randint(1, 3),
        seq_len=rng.randint(3, 48), attention=attention, grad_checkpointing=rng.random() < 0.35,
        dropout=rng.choice((0.0, 0.1)) if rng.random() < 0.1 else None,
        # the plain PyTorch loop (foreach AdamW) the recorded bounds were measured with; the kernels of
        # other stacks are checked against the tracer in tests/test_stack.py
        stack="torch",
    )
    kept = spec.num_layers if layers is None else layers
    if setup.targets == ("all-linear",) and spec.family in LINEAR_ROUTERS:
        # (all-linear would wrap Llama 4's router, whose forward then fails: refused by the planner)
        setup = setup.with_(targets=LINEAR_ROUTER_TARGETS)
    if setup.targets == ("mlp",) and spec.num_experts and not any(spec.sparse_layer(i) for i in range(kept)):
        # PEFT's v4 expert names reach only fused experts, which a model of dense layers has none of
        setup = setup.with_(targets=("attn",))
    if method == "lora":
        setup = plannable_rank(spec, setup)
    fake = rng.random() < 0.5
    if family in MOE_FAMILIES and setup.precision != "pure-bf16":
        fake = False  # torch's fake grouped matmul accepts bf16 only (the CPU kernel takes fp32)
    return Case(seed, config, setup, layers, fake=fake)


def plannable_rank(spec, setup: TrainSetup) -> TrainSetup:
    """`setup` with its rank halved until the planner counts its adapters (1 at the least): the
    random rank may exceed what a tiny config's wrapped layers take."""
    from lora_planner.counts import lora_trainable
    from lora_planner.errors import PlanError

    while setup.rank > 1:
        try:
            lora_trainable(spec, setup)
            break
        except PlanError:
            setup = setup.with_(rank=setup.rank // 2)
    return setup


def run_case(case: Case, allocator: bool = False):
    """Plan the case from its config and trace the same config; returns the `Comparison`. With
    `allocator`, the traced step also runs under torch's profiler and the comparison carries the CPU
    allocator's peak (`measure/allocator.py`); a fake case has none, so run it as `real(case)`."""
    from .step import quiet_libraries
    from .traced_step import sliced, trace

    spec = sliced(spec_from_hf_config(case.config, name=f"fuzz-{case.seed}"), case.layers)
    with quiet_libraries():  # transformers' and PEFT's notices about each other's names
        return trace(spec, case.setup, fake=case.fake, seed=case.seed, hf_config=case.build_config(),
                     allocator=allocator)


def real(case: Case) -> Case:
    """The case run on real CPU tensors (its models are small enough): what the allocator can count."""
    return replace(case, fake=False)


# Seeds the recorded runs (results/trace/fuzz-cpu*.jsonl) have drawn from and the model has been fixed
# against. Seeds from HELD_OUT upward are kept for a later held-out run: nothing is tuned on them.
RECORDED_SEEDS = range(0, 4000)
HELD_OUT = 100_000


def sample_seeds(seeds: range, count: int, draw: int = 0) -> list[int]:
    """`count` seeds of `seeds` (all of them when fewer), drawn without replacement by
    `random.Random(draw)`, in the order drawn: a run cut short holds a random sample too."""
    return random.Random(draw).sample(seeds, min(count, len(seeds)))


# the tests' peak tolerance: the default suite (seeds below 60) within 1%, the slow one within 2%
FAST_SEEDS, FAST_TOLERANCE, SLOW_TOLERANCE = 60, 0.01, 0.02


def known_entry(case: Case, result) -> dict | None:
    """The case's line in `tests/fuzz_known.json` when it misses the tests' tolerance or traces its
    activations inexactly: each |error| rounded up to 0.5%, and why (the phases, or checkpointing)."""
    err = result.errors()
    tolerance = FAST_TOLERANCE if case.seed < FAST_SEEDS else SLOW_TOLERANCE
    exact = result.predicted["activations"] == result.traced["activations"]
    if abs(err["peak"]) <= tolerance and exact:
        return None
    why = [] if exact else ["activation walk misses a tensor"]
    if abs(err["peak"]) > tolerance:
        why.append("checkpointed recompute transients" if case.setup.grad_checkpointing else
                   f"peak in {result.traced_phase}, predicted {result.predicted_phase}")

    def up(x: float) -> float:
        return round(-(-abs(x) // 0.005) * 0.005, 3)

    return {"activations": 0.0 if exact else up(err["activations"]), "case": case.label,
            "peak": up(err["peak"]), "why": "; ".join(why)}


# --- the CPU allocator's peak beside the plan (results/trace/fuzz-cpu-allocator.jsonl) ------------

ALLOCATOR_TOLERANCE = 0.01  # the plan within 1% of the allocator's peak, per case
# The allocator's extra bytes (over the tracer's count at its peak), named by where they were made;
# an op the tracer saw but whose bytes it did not count made them as its own workspace.
RNG_STATE = "outside traced ops: built-in method get_state"
RNG_NAME = "checkpointing's saved CPU RNG states (torch.get_rng_state)"
OUTSIDE = "outside traced ops: "


def record_seed(row: dict) -> int:
    """The seed of a fuzz record (its case label starts `seed=N `)."""
    head = row["case"].split(" ", 1)[0]
    if not head.startswith("seed=") or not head[5:].isdigit():
        raise ValueError(f"not a fuzz record: {row['case']!r}")
    return int(head[5:])


def recorded_case(row: dict) -> Case:
    """The case a record was made from: its seed's, run on real tensors when the record carries the
    allocator's peak. A record that is not its seed's case (another generator) is refused."""
    case = random_case(record_seed(row))
    if row.get("allocator_peak") is not None:
        case = real(case)
    if case.config != row["config"] or case.label != row["case"]:
        raise ValueError(f"the record of {row['case']!r} is not seed {case.seed}'s case now")
    return case


def planned_peak_phase(case: Case) -> Phase:
    """The moment of the plan's peak for the case's step on the CPU, made now, with every byte the
    allocator sees (`traced_step.predicted_step`)."""
    from .traced_step import predicted_step, sliced

    spec = sliced(spec_from_hf_config(case.config, name=f"fuzz-{case.seed}"), case.layers)
    return predicted_step(spec, case.setup, "cpu")[1].peak


def planned_peak(case: Case) -> int:
    """The plan's peak for the case's step on the CPU, made now (`planned_peak_phase`)."""
    return planned_peak_phase(case).bytes


def plan_vs_allocator(row: dict) -> float:
    """(plan - allocator) / allocator on the peak, the plan made now for the record's case."""
    return (planned_peak(recorded_case(row)) - row["allocator_peak"]) / row["allocator_peak"]


def allocator_extras(row: dict) -> dict[str, int]:
    """The record's extra bytes at the allocator's peak (`allocator_extra_by_op`) by mechanism: the
    RNG state checkpointing saves per layer (`torch.get_rng_state`, made outside every op), an op's
    own workspace (by op), and the small tensors made outside the traced ops (Python scalars)."""
    out: dict[str, int] = {}
    for extra in row["allocator_extra_by_op"]:
        op = extra["op"]
        if op == RNG_STATE:
            name = RNG_NAME
        elif op.startswith(OUTSIDE):
            name = "small tensors made outside traced ops"
        else:
            name = f"{op}'s workspace in the CPU kernel"
        out[name] = out.get(name, 0) + extra["bytes"]
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def allocator_known_entry(row: dict) -> dict | None:
    """The case's line in `tests/fuzz_allocator_known.json` when the plan, made now, misses the
    allocator's peak by more than `ALLOCATOR_TOLERANCE`: |error| rounded up to 0.5%, and why: the
    extra bytes' mechanisms the plan does not count at its peak that hold at least 0.5% of the
    allocator's, largest first (the RNG states checkpointing saves, less those the plan's peak holds:
    its `untraced` bytes); else, a plan above the allocator, the moment of its peak."""
    peak = planned_peak_phase(recorded_case(row))
    allocated = row["allocator_peak"]
    error = (peak.bytes - allocated) / allocated
    if abs(error) <= ALLOCATOR_TOLERANCE:
        return None
    extras = allocator_extras(row)
    rng = extras.pop(RNG_NAME, 0)
    if abs(rng - peak.untraced) >= 0.005 * allocated:
        extras[f"{RNG_NAME}: {rng // cpu_rng_state_bytes()} at the allocator's peak, "
               f"{peak.untraced // cpu_rng_state_bytes()} at the plan's"] = abs(rng - peak.untraced)
    named = [k for k, v in sorted(extras.items(), key=lambda kv: -kv[1]) if v >= 0.005 * allocated]
    if not named:
        named = [f"the plan above the allocator at its own peak: {peak.name}, {peak.what}" if error > 0
                 else "the allocator's peak is at another moment than the tracer's"]
    return {"case": row["case"], "plan_vs_allocator": round(-(-abs(error) // 0.005) * 0.005, 3),
            "why": "; ".join(named)}

