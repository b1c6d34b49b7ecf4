"""The step engine (`lora_planner.engine`) held to real CPU steps: random small dense models, each
step traced with the tracer and the CPU allocator (`traced_step.trace(..., allocator=True)`), the
engine's peak and activations beside them and beside the planner's walk on the same step.

Drawing a case needs no torch; running one needs the `measure` extra.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

from ..spec import TrainSetup, spec_from_hf_config

DENSE = ("gpt2", "llama", "mistral", "qwen2", "qwen3")
# further layouts drawn by name (`engine_case(seed, family)`): fused (Phi-3), sandwich norms and
# soft-caps (Gemma-2, eager only: transformers runs it without SDPA), post norms (OLMo 2)
FORMS = ("phi3", "gemma2", "olmo2")


@dataclass(frozen=True)
class EngineCase:
    seed: int
    config: dict
    setup: TrainSetup

    @property
    def label(self) -> str:
        s = self.setup
        return (f"seed={self.seed} {self.config['model_type']} {s.method} {s.precision} b={s.batch_size} "
                f"s={s.seq_len} {s.attention}{' ckpt' if s.grad_checkpointing else ''}")


def dense_config(rng: random.Random, family: str) -> dict:
    """A small dense config.json of `family`, dropout off and no sliding window."""
    layers, vocab = rng.randint(1, 3), rng.randint(64, 1200)
    if family == "gpt2":
        heads = rng.randint(1, 4)
        return {"model_type": "gpt2", "vocab_size": vocab, "n_embd": heads * rng.randint(4, 24),
                "n_layer": layers, "n_head": heads, "n_positions": 256, "attn_pdrop": 0.0,
                "resid_pdrop": 0.0, "embd_pdrop": 0.0, "tie_word_embeddings": rng.random() < 0.7}
    kv, group = rng.choice((1, 2, 3)), rng.choice((1, 2, 4))
    head_dim = 2 * rng.randint(2, 12)
    # transformers asks some of these configs for a width that is a multiple of the heads
    return {"model_type": family, "vocab_size": vocab, "hidden_size": kv * group * rng.randint(2, 24),
            "num_hidden_layers": layers, "num_attention_heads": kv * group, "num_key_value_heads": kv,
            "head_dim": head_dim, "intermediate_size": rng.randint(4, 48) * 4,
            "max_position_embeddings": 256, "tie_word_embeddings": rng.random() < 0.3,
            "attention_bias": rng.random() < 0.3, "sliding_window": None, "use_sliding_window": False,
            "pad_token_id": None, "bos_token_id": None, "eos_token_id": None}


def engine_case(seed: int, family: str | None = None) -> EngineCase:
    """Seed `seed`'s case: a family in turn (or `family`), full or LoRA, fp32, amp or pure-bf16,
    SDPA or eager, checkpointing on or off, batch 1-4 x 8-96 tokens."""
    rng = random.Random(seed)
    family = family or DENSE[seed % len(DENSE)]
    config = dense_config(rng, family)
    setup = TrainSetup(method=rng.choice(("full", "lora")), rank=rng.randint(1, 8),
                       targets=(rng.choice(("default", "attn", "mlp", "all-linear")),),
                       precision=rng.choice(("fp32", "amp", "pure-bf16")), batch_size=rng.randint(1, 4),
                       seq_len=rng.randint(8, 96), attention=rng.choice(("sdpa", "eager")),
                       grad_checkpointing=rng.random() < 0.4, stack="torch")
    if family == "gemma2":  # a window on its even layers, shorter than the sequence or not
        config.update(sliding_window=rng.choice((8, 4096)), query_pre_attn_scalar=rng.choice((16, 64)))
        setup = replace(setup, attention="eager")
    if setup.method == "lora":
        from .fuzz import plannable_rank

        setup = plannable_rank(spec_from_hf_config(config), setup)
    return EngineCase(seed, config, setup)


def compare(config: dict, setup: TrainSetup) -> dict:
    """One real CPU step traced with the allocator, beside the engine's plan and the walk's."""
    from ..engine import plan_step
    from .step import quiet_libraries
    from .traced_step import trace

    spec = spec_from_hf_config(config, name="engine-case")
    plan = plan_step(spec, setup)
    with quiet_libraries():
        traced = trace(spec, setup, hf_config=config, allocator=True)
    allocator = traced.allocator.peak_bytes

    def err(x: int, ref: int) -> float:
        return (x - ref) / ref

    return {"engine_peak": plan.peak.bytes, "engine_tracer_peak": plan.tracer_peak.seen,
            "engine_activations": plan.activations, "walk_peak": traced.predicted["peak"],
            "walk_activations": traced.predicted["activations"], "tracer_peak": traced.traced["peak"],
            "activations": traced.traced["activations"], "allocator_peak": allocator,
            "engine_vs_allocator": err(plan.peak.bytes, allocator),
            "engine_vs_tracer": err(plan.tracer_peak.seen, traced.traced["peak"]),
            "walk_vs_allocator": err(traced.predicted["peak"], allocator),
            "engine_phase": plan.peak.phase, "allocator_phase": traced.allocator.phase}


def replanned_records(path, limit: int | None = None) -> tuple[list[tuple[dict, object, object]], int]:
    """The recorded allocator cases in the JSON-lines file `path` (`results/trace/fuzz-cpu-allocator.jsonl`)
    the engine models, each as (row, case, engine plan), re-planned without torch; and how many it
    refuses (`PlanError`)."""
    import json

    from ..engine import plan_step
    from ..errors import PlanError
    from ..measure.fuzz import recorded_case
    from ..measure.traced_step import sliced

    modelled, refused = [], 0
    for line in path.read_text().splitlines()[:limit]:
        row = json.loads(line)
        case = recorded_case(row)
        spec = sliced(spec_from_hf_config(case.config, name=f"fuzz-{case.seed}"), case.layers)
        try:
            modelled.append((row, case, plan_step(spec, case.setup)))
        except PlanError:
            refused += 1
    return modelled, refused
