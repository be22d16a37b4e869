"""The one error the command modules raise for a wrong invocation; `dxgate.main` turns it into exit status 2."""

from __future__ import annotations


class CommandError(Exception):
    """A command cannot run as asked (missing file, bad argument combination); the message says why."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code
