"""Build real transformers models (on the meta device) from our specs, for independent counts."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from lora_planner.spec import ModelSpec, to_hf_config  # noqa: E402


def hf_config(spec: ModelSpec):
    values = to_hf_config(spec)
    model_type = values.pop("model_type")
    return transformers.CONFIG_MAPPING[model_type](**values)


def build_meta(spec: ModelSpec, task: str = "causal-lm", num_labels: int = 2):
    """The transformers model for `spec`, on the meta device: shapes without memory."""
    config = hf_config(spec)
    config.num_labels = num_labels
    auto = (transformers.AutoModelForSequenceClassification if task == "seq-cls"
            else transformers.AutoModelForCausalLM)
    with torch.device("meta"):
        return auto.from_config(config)


def build_meta_from_config(config: dict):
    """The transformers causal LM a config.json's values describe, on the meta device."""
    values = dict(config)
    built = transformers.CONFIG_MAPPING[values.pop("model_type")](**values)
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(built)
