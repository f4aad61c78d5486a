"""The one exception type that reaches the user as a single line."""
from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix (bad flag, missing file, unreachable peer).

    ``cli.main`` prints ``str(error)`` as one red line and exits with ``exit_code``; any other
    exception is a bug and shows a traceback only with ``--debug``.
    """

    def __init__(self, message: str, *, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code
