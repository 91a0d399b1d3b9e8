"""User-facing errors.

A :class:`UserError` is a problem with what the user asked for (a config value,
a dataset, a workdir), not a bug. The command-line entry points print its
message as one line and exit non-zero, without a traceback; library callers get
an ordinary exception (it is a ``ValueError``).
"""


class UserError(ValueError):
    """A bad input that the user can fix; the message says what and how."""
