"""Tiny GPT-2 models for the measurement tests: seconds on two CPU cores."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# Models this small gain nothing from intra-op threads, and on a shared two-core runner the threads
# only contend: one thread is several times faster there.
torch.set_num_threads(1)

# A vocabulary of 300 holds the 257 byte-level ids of the built-in data.
TINY = {"model_type": "gpt2", "vocab_size": 300, "n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 128}


def tiny_config_file(tmp_path) -> str:
    path = tmp_path / "tiny-gpt2.json"
    path.write_text(json.dumps(TINY))
    return str(path)


def tiny_model(seed: int = 0):
    values = {k: v for k, v in TINY.items() if k != "model_type"}
    config = transformers.GPT2Config(**values, bos_token_id=None, eos_token_id=None, use_cache=False)
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(config).eval()


def tokens(batch: int = 2, seq: int = 16, seed: int = 1):
    return torch.randint(0, TINY["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(seed))
