"""The error of the command line: something the user must fix, told in one line."""

from __future__ import annotations


class UsageError(ValueError):
    """A bad command line, option value or expression.

    The command line prints its message as one line on stderr and exits with status 2 (no
    traceback). Raise it with a message that names what was wrong and what to do instead.

    Examples:
        >>> from flexmask.tools.errors import UsageError
        >>> str(UsageError("--heads must be positive, got 0"))
        '--heads must be positive, got 0'
    """
