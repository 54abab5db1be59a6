"""One error style for every mistake a user can make.

A user mistake — a wrong config value, a file that does not exist, weights that do not fit, a
device that is not there — raises a :class:`KD2Error` (or a subclass) where it is detected, with
*what is wrong* and *how to fix it*. Every entry point under ``tools/`` runs its ``main`` through
:func:`run_main`, which turns such an error into one block on stderr::

    kd2: error: <what is wrong> — <how to fix it>

and exit status 2, without a traceback (``--debug`` or ``KD2_DEBUG=1`` shows it). Programming
errors are not ``KD2Error`` and raise normally.

The subclasses also derive from the builtin exception a caller would expect (``ValueError`` for a
bad value, ``FileNotFoundError`` for a missing file, ...), so ``except ValueError`` keeps working.
"""

from __future__ import annotations

import os
import sys
from typing import Callable, NoReturn

__all__ = [
    "KD2Error",
    "ConfigError",
    "UnknownNameError",
    "DataError",
    "MissingFileError",
    "WeightsError",
    "DeviceError",
    "debug_enabled",
    "format_error",
    "run_main",
]

#: The exit status of a user mistake (as argparse's).
USER_ERROR_EXIT = 2


class KD2Error(Exception):
    """A user mistake: ``what`` is wrong, and ``fix``, how to fix it (may be empty)."""

    def __init__(self, what: str, fix: str = ""):
        self.what, self.fix = str(what), str(fix)
        super().__init__(f"{self.what} — {self.fix}" if self.fix else self.what)

    def __str__(self) -> str:  # KeyError's own __str__ would quote the message
        return f"{self.what} — {self.fix}" if self.fix else self.what

    def __reduce__(self):  # picklable across processes (spawned workers re-raise it)
        return (type(self), (self.what, self.fix))


class ConfigError(KD2Error, ValueError):
    """A config key or value that cannot work."""


class UnknownNameError(ConfigError, KeyError):
    """A config key, method, dataset or model name that does not exist (the message names the
    closest valid one)."""


class DataError(KD2Error, ValueError):
    """A dataset that is not registered, or whose files cannot be read."""


class MissingFileError(KD2Error, FileNotFoundError):
    """A file or directory the run needs does not exist."""


class WeightsError(KD2Error, ValueError):
    """A weights file that cannot be used: unreadable, not a state dict, keys or shapes that do
    not fit the model, or broken (non-finite) values."""


class DeviceError(KD2Error, RuntimeError):
    """A device (``MODEL.DEVICE``) that this machine does not have, or a directory it cannot
    write."""


def debug_enabled(argv: list[str] | None = None) -> bool:
    """``--debug`` among the arguments or ``KD2_DEBUG=1``: show tracebacks of user errors."""
    argv = sys.argv[1:] if argv is None else argv
    return "--debug" in argv or os.environ.get("KD2_DEBUG", "") not in ("", "0")


def format_error(error: BaseException) -> str:
    """The one-block message: ``kd2: error: <message>``."""
    return f"kd2: error: {error}"


def exit_with_error(error: BaseException) -> NoReturn:
    print(format_error(error), file=sys.stderr, flush=True)
    raise SystemExit(USER_ERROR_EXIT)


def run_main(main: Callable[[], object]) -> None:
    """Run ``main()``; a :class:`KD2Error` ends the program with one message and exit 2. An
    ``int`` that ``main`` returns is the exit status (other return values mean success)."""
    debug = debug_enabled()
    if "--debug" in sys.argv:
        sys.argv.remove("--debug")
    if debug:  # worker processes (kd2.engine.launch) read it from the environment
        os.environ["KD2_DEBUG"] = "1"
    try:
        status = main()
    except KD2Error as e:
        if debug:
            raise
        exit_with_error(e)
    if isinstance(status, int) and not isinstance(status, bool) and status:
        sys.exit(status)
