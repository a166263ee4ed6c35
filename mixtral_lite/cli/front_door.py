"""The front door every command shares: flag types, one-line errors, signals, standard streams.

Importing this module costs nothing (no torch): the commands parse their arguments first and
import the model code afterwards, so `--help` and every flag error answer at once.

    with front_door():            # any error below prints one line "error: ..." and exits 2
        ...                       # Ctrl-C exits 130, SIGTERM 143, without a traceback

Set MIXTRAL_LITE_TRACEBACK=1 to see the traceback of an unexpected error.
"""

from __future__ import annotations

import argparse
import math
import os
import secrets
import signal
import sys
from contextlib import contextmanager
from pathlib import Path

EXIT_ERROR = 2  # argparse's status for bad input; quantize_experts uses it too
DTYPE_NAMES = ("bfloat16", "float16", "float32")  # = sorted(config.DTYPES), without importing torch


class Exit(SystemExit):
    """SystemExit with a status and the one-line message already printed (str() gives the message)."""

    def __init__(self, status: int, message: str = ""):
        super().__init__(status)
        self.message = message

    def __str__(self) -> str:
        return self.message


class Terminated(BaseException):
    """SIGTERM, raised where the program is, like KeyboardInterrupt for SIGINT."""


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as _version

    try:
        return _version("mixtral-lite")
    except PackageNotFoundError:
        return "unknown (not installed)"


def add_version(p: argparse.ArgumentParser) -> None:
    p.add_argument("--version", action="version", version=f"mixtral-lite {version()}")


def int_range(lo: int | None = None, hi: int | None = None, what: str = "an integer"):
    """argparse type: an integer in [lo, hi]; the message says the range."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"{value} is out of range: must be {what}")
        return value
    return parse


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0 (rejects nan and inf)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text} must be a finite number > 0")
    return value


POSITIVE = int_range(1, what=">= 1")
NON_NEGATIVE = int_range(0, what=">= 0")
SEED = int_range(-1, (1 << 64) - 1, what="-1 (random) or between 0 and 2**64 - 1")


def add_model_args(p: argparse.ArgumentParser) -> None:
    """The flags of every command that loads a model to generate with (generate, server, chat)."""
    p.add_argument("-m", "--model", type=Path, help="checkpoint folder (default: the shipped Austen model)")
    p.add_argument("-c", "--ctx-size", type=POSITIVE, default=4096,
                   help="KV window when the model has no sliding_window; a window shorter than the "
                        "text is an approximation (Mixtral-8x7B has no sliding window)")
    p.add_argument("-b", "--batch-size", type=POSITIVE, default=512, help="prompt tokens per prefill chunk")
    p.add_argument("-t", "--threads", type=POSITIVE,
                   help="CPU threads for torch (default: the physical cores, fewer when others are busy)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--dtype", choices=DTYPE_NAMES, help="default: float32 on cpu, the checkpoint's on cuda")
    from ..runtime.flags import add_args  # no torch either

    add_args(p)


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=NON_NEGATIVE, default=40, help="0 = off")
    p.add_argument("--top-p", type=float, default=0.95, help="1 = off")
    p.add_argument("-s", "--seed", type=SEED, default=-1, help="sampling seed (default -1: random, printed)")


def resolve_seed(args, what: str) -> None:
    """-s -1: draw a random seed and print it on stderr, so that the `what` can be repeated."""
    if args.seed == -1:
        args.seed = secrets.randbits(63)
        print(f"seed: {args.seed} (-s {args.seed} repeats this {what})", file=sys.stderr)


def fail(message: str, status: int = EXIT_ERROR) -> Exit:
    """Print `error: message` on stderr; return the Exit to raise."""
    print(f"error: {message}", file=sys.stderr)
    return Exit(status, f"error: {message}")


@contextmanager
def front_door():
    """One line for every error, 130/143 for SIGINT/SIGTERM; the signal handler is restored after."""
    old = signal.signal(signal.SIGTERM, _raise_terminated) if _main_thread() else None
    try:
        yield
    except Exit:
        raise
    except SystemExit as e:  # raise SystemExit("error: ...") from the model code: same one line, status 2
        if isinstance(e.code, str):
            raise fail(e.code.removeprefix("error: ")) from None
        raise
    except KeyboardInterrupt:
        raise fail("interrupted (SIGINT)", 130) from None
    except Terminated:
        raise fail("terminated (SIGTERM)", 143) from None
    except BrokenPipeError:  # stdout's reader has gone (`| head`): stop quietly, as command-line tools do
        silence_stdout()
        raise Exit(1) from None
    except Exception as e:  # noqa: BLE001  (the point of the front door)
        if os.environ.get("MIXTRAL_LITE_TRACEBACK"):
            raise
        raise fail(describe(e)) from None
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)


def describe(e: BaseException) -> str:
    """The one line for an exception: our errors carry their own message; others get their type."""
    if isinstance(e, OSError) and e.strerror:
        where = f"{e.filename}: " if e.filename else ""
        return f"{where}{e.strerror}"
    if type(e).__name__ in ("ConfigError", "CheckpointError", "StoreError", "QuantizeError", "NonFiniteError",
                            "ValueError", "FileNotFoundError"):
        return str(e)
    if type(e).__name__ == "OutOfMemoryError":
        return f"out of memory: {str(e).splitlines()[0]} (try fewer --experts-per-layer or a smaller -c)"
    text = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {text} (set MIXTRAL_LITE_TRACEBACK=1 for the traceback)"


def _raise_terminated(signum, frame):
    raise Terminated()


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def silence_stdout() -> None:
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error flushing at exit
    except (OSError, ValueError, AttributeError):
        pass


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
    """The model folder exists, is readable and has a config.json; else one line naming it."""
    if not path.exists():
        raise fail(f"-m/--model: {path} does not exist")
    if not path.is_dir():
        raise fail(f"-m/--model: {path} is a file, not a model folder")
    if not os.access(path, os.R_OK | os.X_OK):
        raise fail(f"-m/--model: {path}: permission denied (the folder is not readable)")
    if not (path / "config.json").is_file():
        raise fail(f"-m/--model: {path} is not a model folder (no config.json)")
