"""4-bit NF4 storage of a QLoRA base model, as bitsandbytes lays it out."""

from __future__ import annotations

import math

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
