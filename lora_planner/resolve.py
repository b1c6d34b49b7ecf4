"""`--model` in: a catalog name or alias, a local config.json (file or folder), or a hub id."""

from __future__ import annotations

import os

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


def resolve_model(text: str) -> ModelSpec:
    path = os.path.expanduser(text)  # os.path, not pathlib: the plain plan imports no pathlib
    if os.path.exists(path):
        return spec_from_config_file(path)
    spec = lookup(text)
    if spec is not None:
        return spec
    if "/" in text and not text.startswith((".", "/", "~")) and not text.endswith(".json"):
        if not is_hub_id(text):
            raise PlanError(f"no such file, and {text!r} is not a hub id (owner/name of ASCII "
                            "letters, digits, '-', '_', '.')")
        return spec_from_hf_config(fetch_hub_config(text), name=text, source=text)
    if text.endswith(".json") or "/" in text:
        from .validate import printable

        raise PlanError(f"no such file: {printable(text)}")
    return get_model(text)  # raises with close names
