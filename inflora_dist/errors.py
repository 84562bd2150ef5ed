"""Errors caused by the user's input or environment, and how the command-line entry points report them.

`UserError` marks our own exceptions whose message names the cause (a bad config key, a path, a data file, an
image, a locked or incompatible run directory, ranks that disagree, a loss that is not finite, a full disk).
Together with the built-in exceptions that input raises (ValueError, FileNotFoundError, ...) they are printed
by `run_command` as one line, `<command>: error: <Type>: <message>`, with exit status 2 and no traceback
(INFLORA_DEBUG=1 prints it too). Any other exception is a bug and keeps its traceback. docs/training.md lists
the exit statuses.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable
from typing import NoReturn

#: Exit status of a command stopped by an error in its input or environment (argparse's, for bad arguments).
USER_ERROR_EXIT_CODE = 2


#: Exit status after Ctrl-C (128 + SIGINT, the shell's convention).
INTERRUPTED_EXIT_CODE = 130


class UserError(Exception):
    """Base of our exceptions caused by the user's input or environment: their message names the cause."""


class WriteError(UserError, OSError):
    """A file or folder of a run could not be written (a full disk, a quota, an I/O error): the message names
    the path and the cause; what was complete before is untouched and the partial output was removed."""


#: What input and environment raise besides our own errors.
USER_ERRORS: tuple[type[BaseException], ...] = (
    UserError, ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, MemoryError,
)  # fmt: skip


def run_command(main: Callable[[], object], exit: Callable[[int], NoReturn] = sys.exit) -> NoReturn:
    """Run an entry point's `main` and exit with the status it returns (0 if it returns anything else: figures,
    a task sequence); a user error is printed as one line and exits USER_ERROR_EXIT_CODE on every rank that
    raised it (see the module docstring); a Ctrl-C that reached the command (a second one, or one where no
    handler checkpoints) prints one line and exits INTERRUPTED_EXIT_CODE."""
    try:
        result = main()
        code = result if isinstance(result, int) else 0
    except USER_ERRORS as err:
        if os.environ.get("INFLORA_DEBUG") == "1":
            traceback.print_exc()
        message = str(err) or "(no message)"
        print(f"{_prefix()}{_command()}: error: {type(err).__name__}: {message}", file=sys.stderr, flush=True)
        code = USER_ERROR_EXIT_CODE
    except KeyboardInterrupt:
        if os.environ.get("INFLORA_DEBUG") == "1":
            traceback.print_exc()
        print(f"{_prefix()}{_command()}: interrupted", file=sys.stderr, flush=True)
        code = INTERRUPTED_EXIT_CODE
    exit(code)


def _prefix() -> str:
    """'[rank N] ' when several ranks run the command, else ''."""
    return f"[rank {os.environ.get('RANK', '0')}] " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""


def _command() -> str:
    return os.path.basename(sys.argv[0]) or "inflora_dist"
