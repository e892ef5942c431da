"""Ending the `autoprec` process (and its workers) when the command is done, whatever model.py left running."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from typing import NoReturn

# How long the interpreter may take to shut down while model.py's threads are still running.
LEFT_THREADS_WAIT_S = float(os.environ.get("AUTOPREC_THREADS_EXIT_S", "5"))


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


def _left_threads() -> list[threading.Thread]:
    main = threading.main_thread()
    return [t for t in threading.enumerate() if t is not main and not t.daemon and t.is_alive()]


def exit_process(code: int) -> NoReturn:
    """Exit with `code`. Python waits for every non-daemon thread before it exits: one that model.py
    started and never ends would hang the command after its output. When such threads are alive, the
    exit gets LEFT_THREADS_WAIT_S seconds; then one note and the exit without them. Ctrl-C meanwhile
    exits at once (130), without a traceback."""
    left = _left_threads()
    if left and threading.current_thread() is threading.main_thread():
        def interrupted(signum, frame) -> None:  # noqa: ARG001
            _flush()
            os._exit(code or 130)

        def give_up() -> None:
            time.sleep(LEFT_THREADS_WAIT_S)
            names = ", ".join(t.name for t in _left_threads()) or "?"
            with contextlib.suppress(Exception):
                print(f"autoprec: note: threads started by model.py are still running ({names}); exiting "
                      "without waiting for them", file=sys.stderr)
            _flush()
            os._exit(code)

        with contextlib.suppress(ValueError, OSError):
            signal.signal(signal.SIGINT, interrupted)
            signal.signal(signal.SIGTERM, interrupted)
        threading.Thread(target=give_up, name="autoprec-exit", daemon=True).start()
    sys.exit(code)
