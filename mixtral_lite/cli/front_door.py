"""The front door of the commands: one-line errors, signals, standard streams, --version.

The one-line error handler itself (front_door, fail, describe) is runtime/errors.py, shared with the server.

Importing this module costs nothing (no torch): the commands parse their arguments first (the
flags themselves are defined in mixtral_lite/runtime/flags.py) and import the model code
afterwards, so `--help` and every flag error answer at once.

    with front_door():            # any error below prints one line "error: ..." and exits 2
        ...                       # Ctrl-C exits 130, SIGTERM 143, without a traceback

Set MIXTRAL_LITE_TRACEBACK=1 to see the traceback of an unexpected error.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..runtime.errors import EXIT_ERROR, Exit, Terminated, describe, fail, front_door, silence_stdout

__all__ = ["EXIT_ERROR", "Exit", "Terminated", "describe", "fail", "front_door", "silence_stdout", "add_version",
           "check_model_dir", "check_output", "guard_std_streams", "read_text", "version"]


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as _version

    try:
        return _version("mixtral-lite")
    except PackageNotFoundError:
        return "unknown (not installed)"


def add_version(p: argparse.ArgumentParser) -> None:
    p.add_argument("--version", action="version", version=f"mixtral-lite {version()}")


def guard_std_streams() -> None:
    """A closed stderr becomes /dev/null (figures never land in stdout); a closed stdout is an error."""
    if _closed(2):
        fd = os.open(os.devnull, os.O_WRONLY)
        if fd != 2:
            os.dup2(fd, 2)
            os.close(fd)
        sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115  (lives as long as the process)
    if _closed(1) or sys.stdout is None:
        raise fail("stdout is closed: the generated text has nowhere to go (redirect it to a file or /dev/null)")


def _closed(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return True
    stream = sys.stderr if fd == 2 else sys.stdout
    return stream is None


def check_output(path: Path | None, flag: str) -> None:
    """Fail now, before any loading, if `path` cannot be written as a new or replaced file."""
    if path is None:
        return
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise fail(f"{flag}: {path} is a directory (give a file name)")
    if not parent.is_dir():
        raise fail(f"{flag}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise fail(f"{flag}: folder {parent} is not writable")


def read_text(path: Path, flag: str = "-f/--file") -> str:
    """A UTF-8 text file ("-" = stdin); binary, non-UTF-8, missing, folder or unreadable: one line."""
    if str(path) == "-":
        data, name = sys.stdin.buffer.read(), "stdin"
    else:
        name = str(path)
        if path.is_dir():
            raise fail(f"{flag}: {path} is a directory, not a text file")
        if not path.exists():
            raise fail(f"{flag}: {path} does not exist")
        try:
            data = path.read_bytes()
        except OSError as e:
            raise fail(f"{flag}: {path}: {e.strerror}") from None
    if b"\0" in data:
        raise fail(f"{flag}: {name} is a binary file (it holds NUL bytes), not text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise fail(f"{flag}: {name} is not UTF-8 text (byte {data[e.start]:#04x} at offset {e.start})") from None


def check_model_dir(path: Path) -> None:
    """A readable model folder with a config.json, or a GGUF file; else one line naming it."""
    from ..model.source import model_unreadable

    why = model_unreadable(path)
    if why:
        raise fail(f"-m/--model: {why}")
