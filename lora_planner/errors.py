"""The one error type for user mistakes, and the install hints its messages give."""


def install_hint(extra: str) -> str:
    """How to install an extra, from PyPI and from a clone (as the README installs)."""
    return f"pip install 'lora-plan[{extra}]' (from a clone: pip install -e '.[{extra}]')"


MEASURE_EXTRA = install_hint("measure")  # torch, transformers, peft, safetensors, pyyaml
REPORTS_EXTRA = install_hint("reports")  # pandas, matplotlib


class PlanError(ValueError):
    """A mistake in what the user asked for: an unknown model, a bad rank, a malformed config.

    The CLI turns it into a one-line message and exit code 2; library callers catch it like any
    ValueError.
    """
