"""The one base class of errors a user can fix (a setting, a DSN, a model id, a stopped stack).

The CLI prints such an error as one line and its ``hint`` as a second, never a traceback; anything else
is a bug and keeps its traceback. Each subclass says what to try in its own ``hint``.
"""

from __future__ import annotations


class UserFacingError(Exception):
    hint: str = ""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        if hint:
            self.hint = hint

    @property
    def message(self) -> str:
        """The error without any hint it carries in its text."""
        return str(self)
