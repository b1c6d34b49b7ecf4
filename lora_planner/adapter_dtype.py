"""The LoRA adapters' dtype, which need not be the base model's.

PEFT's `get_peft_model(..., autocast_adapter_dtype=True)`, its default, upcasts adapters made in
fp16 or bf16 to fp32 (`tuners_utils.cast_adapter_dtype`); fp32 adapters it leaves alone. So on a
model loaded in bf16 the base is 16-bit and every `lora_A`, `lora_B` (and DoRA magnitude) is fp32,
with fp32 gradients and, under torch's optimizers, fp32 states; no master copy is needed. Each
wrapped layer casts its input to the adapter's dtype before `lora_A` (`_cast_input_dtype`).

`--adapter-dtype`:
- `auto` (the default): the adapters in the dtype the precision convention gives every trainable
  tensor; fp32 under fp32 and amp, 16-bit under mixed, bf16 and pure-bf16 (the plan before this
  option existed, and `autocast_adapter_dtype=False`);
- `fp32`: PEFT's default on a 16-bit base. Under `pure-bf16` the step runs with no autocast (a
  plain loop over a bf16 model); under `mixed` and `bf16` the base's 16-bit compute is the
  Trainer's `bf16=True` autocast, which runs each adapter's matmuls on 16-bit copies;
- `bf16`: 16-bit adapters, as `auto` on a 16-bit base; refused on an fp32 base.

Only LoRA's adapters change dtype: trained biases and modules_to_save copies stay in the base's.
"""

from __future__ import annotations

from .errors import PlanError
from .precision import Precision

ADAPTER_DTYPES = ("auto", "fp32", "bf16")
# fp32 adapters: fp32 weights and gradients, no master copy, fp32 optimizer states
FP32_ADAPTERS = Precision("fp32-adapters", 4, 4, 0, 4, "fp32", "fp32 LoRA adapters (PEFT's default)")


def fp32_adapters(method: str, precision: Precision, adapter_dtype: str) -> bool:
    """True when the adapters are fp32 over a 16-bit base: the one case the option changes.

    A PlanError for a dtype we do not know, and for 16-bit adapters over an fp32 base (PEFT never
    makes them). Full fine-tuning has no adapters. QLoRA's adapters over bitsandbytes' 4-bit layers
    are fp32 the same way (PEFT's `_cast_adapter_dtype`; its bnb `Linear4bit` casts the input to
    lora_A's dtype outside autocast), traced byte for byte in `tests/test_trace_qlora.py`.
    `prepare_model_for_kbit_training`, which also casts every other 16-bit parameter (embeddings,
    norms, an unquantised head) to fp32 (peft/utils/other.py), is not modelled.
    """
    if adapter_dtype not in ADAPTER_DTYPES:
        raise PlanError(f"--adapter-dtype must be one of {', '.join(ADAPTER_DTYPES)}, got {adapter_dtype!r}")
    if adapter_dtype == "auto":
        return False
    sixteen = precision.weight_bytes == 2
    if adapter_dtype == "bf16" and not sixteen:
        raise PlanError(f"--adapter-dtype bf16 needs a 16-bit base (--precision mixed, bf16 or pure-bf16); "
                        f"under {precision.name} the adapters are fp32 like the weights")
    return adapter_dtype == "fp32" and sixteen and method in ("lora", "qlora")


def adapter_autocast(precision: Precision) -> bool:
    """fp32 adapters on a 16-bit base run under autocast when the convention computes in 16 bits
    by autocast (mixed, bf16: the Trainer's `bf16=True`), not under pure-bf16 (a plain loop)."""
    return precision.name in ("mixed", "bf16")
