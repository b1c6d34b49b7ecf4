"""Checkpoint sizes: safetensors files as `save_pretrained` writes them, header included.

A safetensors file is an 8-byte little-endian header length, a compact JSON header padded with
spaces to a multiple of 8 bytes, then the raw tensor bytes. The header names each tensor with its
dtype, shape and byte offsets, tensors ordered by name (all share one dtype here), with metadata
`{"format": "pt"}` first, as transformers and PEFT write it. Sizes are for one unsharded file;
a sharded save repeats a header per shard (a few kilobytes each) and adds an index JSON.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from functools import lru_cache

from .architecture import Param
from .precision import DTYPE_BYTES, SAFETENSORS_DTYPE

_METADATA = {"format": "pt"}


def safetensors_header(params: Iterable[Param], dtype: str) -> bytes:
    """The exact header (JSON, padded to 8 bytes) safetensors writes for these tensors."""
    width = DTYPE_BYTES[dtype]
    header: dict[str, object] = {"__metadata__": _METADATA}
    offset = 0
    for p in sorted(params, key=lambda p: p.name):
        size = p.numel * width
        header[p.name] = {
            "dtype": SAFETENSORS_DTYPE[dtype],
            "shape": list(p.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    return text + b" " * (-len(text) % 8)


def safetensors_bytes(params: Iterable[Param], dtype: str) -> int:
    """File size: 8 + len(header) + sum(numel) x bytes per element of `dtype`."""
    return _safetensors_bytes(tuple(params), dtype)


@lru_cache(maxsize=32)  # full, LoRA and QLoRA plans of one model write the same base checkpoint
def _safetensors_bytes(params: tuple[Param, ...], dtype: str) -> int:
    data = sum(p.numel for p in params) * DTYPE_BYTES[dtype]
    return 8 + len(safetensors_header(params, dtype)) + data


def storage_for_tasks(tasks: int, full_checkpoint: int, adapter_checkpoint: int) -> dict[str, int]:
    """N task-specific fine-tunes: N full copies, against one base plus N adapters."""
    return {
        "full_copies": tasks * full_checkpoint,
        "base_plus_adapters": full_checkpoint + tasks * adapter_checkpoint,
    }


# Families whose published checkpoints store the fused expert weights in MXFP4 (OpenAI's gpt-oss)
MXFP4_FAMILIES = ("gpt_oss",)
MXFP4_BLOCK = 32  # weights per shared scale


def mxfp4_tensor_bytes(params: Iterable[Param]) -> tuple[int, int]:
    """(MXFP4 expert bytes, bf16 bytes of the rest): the tensor data of a checkpoint that stores each
    fused 3-D expert weight in MXFP4, as OpenAI publishes gpt-oss. A weight (E, in, out) is saved as
    `_blocks`, 4-bit values two to a byte, and `_scales`, one 8-bit power of two per 32 inputs:
    E x out x (ceil(in / 32) x 16 + ceil(in / 32)) bytes, 17/32 of a byte per weight (4.25 bits).
    Every other tensor, the expert biases included, is bf16. Headers are left out (kilobytes).
    Source: transformers 5 `integrations/mxfp4.py` (blocks (E, out, in/32, 16) uint8, scales
    (E, out, in/32) uint8). transformers trains no MXFP4 model: it dequantises the experts to bf16
    first (`Mxfp4Config(dequantize=True)`), which is what the plan's weights are."""
    experts, rest = 0, 0
    for p in params:
        if len(p.shape) == 3 and p.name.endswith(("gate_up_proj", "down_proj")):
            e, d_in, d_out = p.shape  # GPT-OSS stores (E, in, out)
            groups = -(-d_in // MXFP4_BLOCK)
            experts += e * d_out * groups * (MXFP4_BLOCK // 2 + 1)
        else:
            rest += p.numel * 2
    return experts, rest
