"""4-bit NF4 storage of a QLoRA base model, as bitsandbytes lays it out."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from .architecture import LINEAR_KINDS, Architecture

if TYPE_CHECKING:
    from .counts import Trainable

NF4_BLOCK = 64  # values per quantisation block
DOUBLE_QUANT_BLOCK = 256  # first-level absmax values per second-level block


def nf4_bytes(numel: int, double_quant: bool) -> int:
    """Bytes of one weight quantised to NF4.

    Packed values: ceil(numel / 2) bytes (two 4-bit codes per byte). Without double quantisation,
    one fp32 absmax per 64-value block: 4 x ceil(numel / 64). With it (the QLoRA paper's default),
    the absmax values are themselves quantised to 1 byte each, plus one fp32 absmax per 256 of them
    and one fp32 offset: ceil(numel / 64) + 4 x ceil(blocks / 256) + 4.
    That is 0.5625 B per weight without and about 0.5159 B with double quantisation. The 16-entry
    code tables bitsandbytes keeps per layer (under 100 bytes) are left out.
    """
    blocks = math.ceil(numel / NF4_BLOCK)
    packed = math.ceil(numel / 2)
    if not double_quant:
        return packed + 4 * blocks
    return packed + blocks + 4 * math.ceil(blocks / DOUBLE_QUANT_BLOCK) + 4


def nf4_state_bytes(numel: int, double_quant: bool) -> int:
    """The quantisation state of one NF4 weight: `nf4_bytes` less its packed codes (ceil(numel / 2)).

    bitsandbytes keeps it in the layer's `quant_state`, a plain attribute rather than a parameter:
    FSDP and ZeRO-3 shard and gather only the packed codes (stored as a 16-bit tensor under
    `bnb_4bit_quant_storage`), so every GPU holds the whole state of every layer.
    """
    return nf4_bytes(numel, double_quant) - math.ceil(numel / 2)


def quantised_params(arch: Architecture, trainable: Trainable, experts: bool = False) -> set[str]:
    """Names of the weights QLoRA stores as NF4.

    bitsandbytes (`replace_with_bnb_linear`) swaps every `nn.Linear` but the output head (and any
    module trained in full) for a 4-bit layer; biases stay 16-bit. Fused 3-D expert weights
    (Mixtral under transformers 5) are parameters of a non-Linear module, so they stay 16-bit
    (bitsandbytes issue #1849); `experts=True` plans a stack that quantises them too.
    """
    saved_paths = {m.path for m in trainable.saved_modules}
    return {
        p.name for m in arch.modules
        if (m.kind in LINEAR_KINDS or (experts and m.kind == "experts"))
        and m.path != arch.head_path and m.path not in saved_paths
        for p in m.params if not p.name.endswith((".bias", "_bias"))  # GPT-OSS's expert biases too
    }


def dequant_transient_bytes(numels: list[int], compute_bytes: int = 2) -> int:
    """QLoRA's dequantisation transient: the 16-bit copy of one NF4 weight being multiplied.

    bitsandbytes' 4-bit matmul dequantises the weight to the compute dtype (bf16) for each forward
    and each input-gradient product and frees it after; the largest such copy is alive at once:
    max(numel) x compute bytes.
    """
    return max(numels, default=0) * compute_bytes
