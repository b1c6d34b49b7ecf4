"""The one error type for user mistakes."""


class PlanError(ValueError):
    """A mistake in what the user asked for: an unknown model, a bad rank, a malformed config.

    The CLI turns it into a one-line message and exit code 2; library callers catch it like any
    ValueError.
    """
