"""Errors a user can act on.

Every error banklora raises for a user mistake names what was wrong, where (file:line, field,
flag) and what to do. The CLI prints the message and exits with the error's code: 2 for bad
input, 1 for a failure of the run itself. Nothing else should reach the user as a traceback.
"""

from __future__ import annotations


class BankloraError(Exception):
    """A failure the user should hear about in one clear sentence (exit code 1)."""

    exit_code = 1


class UsageError(BankloraError):
    """Bad input: a flag, a file, a field or a directory the user gave us (exit code 2)."""

    exit_code = 2
