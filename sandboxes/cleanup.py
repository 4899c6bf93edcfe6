"""Last-resort cleanup of live sandboxes when the process ends without closing them.

Normal code closes sandboxes with ``async with`` (Ctrl-C cancels tasks, so their ``close``
runs). This module covers the rest: at interpreter exit (``atexit``) and on SIGTERM/SIGHUP
(whose default action would skip ``atexit``) every registered cleanup runs synchronously, then
the signal's default action proceeds. SIGKILL cannot be caught: that is what reaping on the next
factory start is for.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import signal
import threading
from collections.abc import Callable

logger = logging.getLogger(__name__)

_cleanups: dict[int, Callable[[], None]] = {}
_lock = threading.RLock()  # re-entered by a signal arriving while register() holds it
_installed = False


def register(key: object, cleanup: Callable[[], None]) -> None:
    """Run ``cleanup`` at exit unless ``unregister(key)`` is called first."""
    _install()
    with _lock:
        _cleanups[id(key)] = cleanup


def unregister(key: object) -> None:
    with _lock:
        _cleanups.pop(id(key), None)


def run_all() -> None:
    with _lock:
        pending = list(_cleanups.values())
        _cleanups.clear()
    for cleanup in pending:
        try:
            cleanup()
        except Exception as exc:  # keep cleaning the others
            logger.warning("sandbox cleanup at exit failed: %s", exc)


def _on_signal(signum: int, frame: object) -> None:
    run_all()
    previous = _previous.get(signum, signal.SIG_DFL)
    if callable(previous):
        previous(signum, frame)
        return
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


_previous: dict[int, object] = {}


def _install() -> None:
    global _installed
    if _installed:
        return
    _installed = True
    atexit.register(run_all)
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in (signal.SIGTERM, signal.SIGHUP):
        with contextlib.suppress(ValueError, OSError):
            current = signal.getsignal(signum)
            if current in (signal.SIG_DFL, None) or callable(current):
                _previous[signum] = current
                signal.signal(signum, _on_signal)
