"""The exception every stage raises for a user's mistake.

A ``UserError`` is something the person running a command can fix (a wrong path, a bad value, a
corrupt file, labels made with another k): the command-line entry points (``delulu_hf.cli``)
print its message as one line and exit with code 2, without a traceback. Everything else is a
program error and keeps its traceback.
"""

from __future__ import annotations

__all__ = ["UserError"]


class UserError(ValueError):
    """A mistake in the user's input, reported as one line (exit code 2) by the command lines.

    Subclasses ``ValueError`` so code that already catches ``ValueError`` keeps working.
    """
