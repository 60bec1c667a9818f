"""Small assertions shared by the conformance tests."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def errno_of(call: Callable[..., Any], *args: Any, **kwargs: Any) -> int:
    """The errno that ``call(*args)`` fails with; an AssertionError if it succeeds."""
    try:
        call(*args, **kwargs)
    except OSError as exc:
        return exc.errno
    raise AssertionError(f"{getattr(call, '__name__', call)}{args} succeeded; expected an error")
