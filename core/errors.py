"""Errors a user can act on. Each kind has its own exit code; the CLI prints one line on
stderr (what went wrong and how to fix it) and no traceback unless --debug is given.

Anything else that escapes a command is a bug: it keeps its traceback and exits 1.
"""

from __future__ import annotations

# exit code -> what it means; `visionloop --help` and docs/reference.md print this table
EXIT_CODES = {
    0: "success",
    1: "a bug in visionloop (the traceback is printed; please report it)",
    2: "bad input: arguments, config file, data folder, images",
    3: "a server the command needs is unreachable (TorchServe, Label Studio, PostgreSQL)",
    4: "another run holds the lock (retrain, push); try again when it is done",
    5: "a promotion stopped part-way; the champion record was not advanced",
    6: "refused: Label Studio rejected the API key, or TorchServe the token",
    7: "something to install is missing (Java, an optional extra)",
    8: "no space left on the disk",
}


class UserError(Exception):
    """An error the user can fix from its message; `hint` says how."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint

    def one_line(self) -> str:
        text = " ".join(str(self).split())  # a message is one line on a terminal
        return f"{text}. {self.hint}" if self.hint else text


class InputError(UserError, ValueError):
    """Arguments, a config file, a data folder or images that cannot be used."""

    exit_code = 2


class ServiceUnavailable(UserError):
    exit_code = 3


class Busy(UserError):
    exit_code = 4


class Incomplete(UserError):
    exit_code = 5


class AccessDenied(UserError):
    exit_code = 6


class MissingDependency(UserError):
    exit_code = 7


class DiskFull(UserError):
    exit_code = 8


def require_module(module: str, extra: str, why: str) -> None:
    """MissingDependency naming the extra that installs `module`, if it is not importable."""
    from importlib.util import find_spec

    if find_spec(module) is None:
        raise MissingDependency(
            f"{why} needs the Python package {module}, which is not installed",
            hint=f"install it with: pip install 'visionloop[{extra}]'"
                 + (" (or 'visionloop[gpu]' on a CUDA host)" if extra == "cpu" else ""))
