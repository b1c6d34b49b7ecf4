"""`--model` in: a catalog name or alias, a local config.json (file or folder), or a hub id."""

from __future__ import annotations

import os
from dataclasses import dataclass

from .catalog import get_model, lookup
from .errors import PlanError
from .spec import ModelSpec, spec_from_config_file, spec_from_hf_config

HUB_URL = "https://huggingface.co/{repo}/resolve/main/config.json"
# The hub's own rule for a repository id (huggingface_hub's `validate_repo_id`): owner/name of ASCII
# letters, digits, '-', '_' and '.', the name at most 96 characters, no '--' or '..', not starting or
# ending with '-' or '.'.
_HUB_PART = r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?"
HUB_ID = rf"^{_HUB_PART}/{_HUB_PART}$"


def is_hub_id(text: str) -> bool:
    import re

    return (re.fullmatch(HUB_ID, text) is not None and len(text.split("/")[1]) <= 96
            and "--" not in text and ".." not in text)


def fetch_hub_config(repo: str, timeout: float = 5.0) -> dict:
    """Download a hub repository's config.json (HF_TOKEN is sent for gated models)."""
    import urllib.error
    import urllib.parse
    import urllib.request

    from .validate import MAX_CONFIG_BYTES, parse_json

    if not is_hub_id(repo):
        raise PlanError(f"{repo!r} is not a hub id (owner/name of letters, digits, '-', '_', '.')")
    request = urllib.request.Request(HUB_URL.format(repo=urllib.parse.quote(repo, safe="/")))
    token = os.environ.get("HF_TOKEN")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            data = response.read(MAX_CONFIG_BYTES + 1)
    except urllib.error.HTTPError as exc:
        raise PlanError(
            f"the hub answered {exc.code} for {repo!r} (gated or missing?); "
            "pass a local config.json instead"
        ) from None
    except (urllib.error.URLError, OSError, TimeoutError, ValueError):
        raise PlanError(
            f"cannot reach the Hugging Face hub for {repo!r}; pass a local config.json "
            "(a file or the model's folder) with --model"
        ) from None
    if len(data) > MAX_CONFIG_BYTES:
        raise PlanError(f"the hub's config.json for {repo!r} is larger than a config file is")
    return parse_json(data, f"the hub's config.json for {repo!r}")


@dataclass(frozen=True)
class OtherConfig:
    """A local config.json whose `model_type` none of our families lays out: `plan` records its
    step from transformers (`measure.recorded`) instead of walking it."""

    config: dict
    model_type: str
    name: str
    source: str


def _other_type(model_type: str) -> bool:
    """Whether no family of ours lays out this model_type (Gemma 3's multimodal one is read)."""
    from .spec import MODEL_TYPE_TO_FAMILY

    return model_type not in MODEL_TYPE_TO_FAMILY and model_type != "gemma3"


def _other_config(path: str) -> OtherConfig | None:
    from pathlib import Path

    from .spec import _read_config_json, config_display_name

    config = _read_config_json(Path(path))
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if not isinstance(model_type, str) or not _other_type(model_type):
        return None
    return OtherConfig(config, model_type, config_display_name(Path(path), config), path)


def resolve_model(text: str, other_types: bool = False) -> ModelSpec | OtherConfig:
    """The model `--model` names. With `other_types`, a local config.json of a model_type no family
    of ours lays out comes back as an `OtherConfig` (else: an error naming the supported ones)."""
    path = os.path.expanduser(text)  # os.path, not pathlib: the plain plan imports no pathlib
    if os.path.exists(path):
        other = _other_config(path) if other_types else None
        return other if other is not None else spec_from_config_file(path)
    spec = lookup(text)
    if spec is not None:
        return spec
    if "/" in text and not text.startswith((".", "/", "~")) and not text.endswith(".json"):
        if not is_hub_id(text):
            raise PlanError(f"no such file, and {text!r} is not a hub id (owner/name of ASCII "
                            "letters, digits, '-', '_', '.')")
        config = fetch_hub_config(text)
        model_type = config.get("model_type") if isinstance(config, dict) else None
        if other_types and isinstance(model_type, str) and _other_type(model_type):
            raise PlanError(f"{text}'s model_type {model_type!r} is planned from transformers' own code "
                            "from a local config.json only: save the hub's config.json and pass its path")
        return spec_from_hf_config(config, name=text, source=text)
    if text.endswith(".json") or "/" in text:
        from .validate import printable

        raise PlanError(f"no such file: {printable(text)}")
    return get_model(text)  # raises with close names
