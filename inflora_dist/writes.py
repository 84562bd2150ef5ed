"""Writing a run's small files (metrics, plots, the config record): atomically, and a failure as one error.

A reader never sees a partial file: each is written to a temporary file in the
same folder, synced and renamed into place. A failed write (a full disk, a
quota, an I/O error) removes the temporary file, leaves what was there before
untouched and raises WriteError naming the path and the cause, which the
command-line entry points print as one line (errors.run_command).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from inflora_dist.errors import WriteError


def atomic_write(path: str | os.PathLike[str], write: Callable[[BinaryIO], None]) -> None:
    """Call `write` on a temporary file beside `path`, then rename it to `path` (parents created).
    Raises WriteError naming `path` when the file system refuses."""
    path, tmp = Path(path), None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would hide a run's files from its group
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise WriteError(f"writing {path} failed ({type(err).__name__}: {err}); it is as it was") from err
        raise


def write_text(path: str | os.PathLike[str], text: str) -> None:
    """`text` as UTF-8 at `path`, atomically (see `atomic_write`)."""
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def write_json(path: str | os.PathLike[str], content: Any) -> None:
    """`content` as indented JSON at `path`, atomically (see `atomic_write`); NaN and infinity are refused."""
    write_text(path, json.dumps(content, indent=2, allow_nan=False) + "\n")


def _umask() -> int:
    """The process's umask (read by setting it and setting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
