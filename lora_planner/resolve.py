"""`--model` in: a catalog name or alias, a local config.json (file or folder), or a hub id."""

from __future__ import annotations

import os

from .catalog import get_model, lookup
from .errors import PlanError
from .spec import ModelSpec, spec_from_config_file, spec_from_hf_config

HUB_URL = "https://huggingface.co/{repo}/resolve/main/config.json"


def fetch_hub_config(repo: str, timeout: float = 5.0) -> dict:
    """Download a hub repository's config.json (HF_TOKEN is sent for gated models)."""
    import json
    import urllib.error
    import urllib.request

    request = urllib.request.Request(HUB_URL.format(repo=repo))
    token = os.environ.get("HF_TOKEN")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        raise PlanError(
            f"the hub answered {exc.code} for {repo!r} (gated or missing?); "
            "pass a local config.json instead"
        ) from None
    except (urllib.error.URLError, OSError, TimeoutError):
        raise PlanError(
            f"cannot reach the Hugging Face hub for {repo!r}; pass a local config.json "
            "(a file or the model's folder) with --model"
        ) from None
    except json.JSONDecodeError:
        raise PlanError(f"the hub's config.json for {repo!r} is not valid JSON") from None


def resolve_model(text: str) -> ModelSpec:
    path = os.path.expanduser(text)  # os.path, not pathlib: the plain plan imports no pathlib
    if os.path.exists(path):
        return spec_from_config_file(path)
    spec = lookup(text)
    if spec is not None:
        return spec
    if "/" in text and not text.startswith((".", "/", "~")) and not text.endswith(".json"):
        return spec_from_hf_config(fetch_hub_config(text), name=text, source=text)
    if text.endswith(".json") or "/" in text:
        raise PlanError(f"no such file: {text}")
    return get_model(text)  # raises with close names
