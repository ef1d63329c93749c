"""User-facing errors: a bad input gets one clear message (the CLI prints it without a traceback)."""


class UsageError(ValueError):
    """A configuration, path or input the user can fix; the message says how."""
