"""The one exception type lowbit raises for bad input.

The CLI prints `LowbitError` as one line and exits with status 2; anything else is a bug
and keeps its traceback.
"""


class LowbitError(Exception):
    """Bad input or an impossible request: the message says what, where, and what to do."""
