"""Signals that end a command the way Ctrl-C does.

A command that writes a large scratch file or directory before renaming it
into place (``mkimage``, ``sefs create``) removes it when interrupted. Ctrl-C
does that by unwinding (KeyboardInterrupt); SIGTERM and SIGHUP (``timeout``,
``docker stop``, a cancelled CI job, a closed terminal) would end the process
where it stands. :func:`ended_like_ctrl_c` makes them unwind too.
"""

from __future__ import annotations

import _signal  # signal's C module: a plain mkimage does not load signal
import contextlib


def _interrupt(_signum, _frame) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def ended_like_ctrl_c():
    """Within the block, SIGTERM and SIGHUP raise KeyboardInterrupt (exit 130).

    A signal the caller set to be ignored (``nohup``) stays ignored; the
    handlers are the caller's again after the block. Only the main thread may
    set them: elsewhere they stay as they are.
    """
    previous = {}
    for signum in (_signal.SIGTERM, _signal.SIGHUP):
        if _signal.getsignal(signum) == _signal.SIG_DFL:
            try:
                previous[signum] = _signal.signal(signum, _interrupt)
            except ValueError:  # not the main thread
                break
    try:
        yield
    finally:
        for signum, handler in previous.items():
            _signal.signal(signum, handler)
