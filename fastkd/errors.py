"""Errors a user can fix: the CLI prints their message (no traceback) and exits non-zero."""


class FastkdError(Exception):
    """Bad input: the message names the offending value and what would be valid."""
