"""The one-line error handler every front end shares (generate, perplexity, chat, the server): any error
below it prints one line `error: ...` naming the flag, file, tensor or field, and exits 2; Ctrl-C exits 130,
SIGTERM 143, without a traceback.

    with front_door():            # any error below prints one line "error: ..." and exits 2
        ...

Set MIXTRAL_LITE_TRACEBACK=1 to see the traceback of an unexpected error. Torch-free.
"""

from __future__ import annotations

import os
import signal
import sys
from contextlib import contextmanager

EXIT_ERROR = 2  # argparse's status for bad input; quantize_experts uses it too


class Exit(SystemExit):
    """SystemExit with a status and the one-line message already printed (str() gives the message)."""

    def __init__(self, status: int, message: str = ""):
        super().__init__(status)
        self.message = message

    def __str__(self) -> str:
        return self.message


class Terminated(BaseException):
    """SIGTERM, raised where the program is, like KeyboardInterrupt for SIGINT."""


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
    if isinstance(e, SystemExit) and isinstance(e.code, str):  # raised in a worker thread (the server's load)
        return e.code.removeprefix("error: ")
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
