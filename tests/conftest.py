"""Suite-wide guards."""

from __future__ import annotations

import sys

import pytest


@pytest.fixture(autouse=True)
def _no_global_deepspeed_config():
    """A DeepSpeed config object made by a test registers itself with transformers globally; while it
    lives, every later model is built under ZeRO-3's partitioning init. Clear it after each test."""
    yield
    module = sys.modules.get("transformers.integrations.deepspeed")
    if module is not None:
        module.unset_hf_deepspeed_config()
