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
