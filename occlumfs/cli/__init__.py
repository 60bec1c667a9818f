"""The ``occlumfs`` command: parse, call the library, print. Nothing else lives here.

The click group is :mod:`occlumfs.cli.group` (one module per command group
besides); its names are loaded from there on first use, so that a plain
``occlumfs mkimage`` (:mod:`occlumfs.cli.quick`) starts without loading click.
"""

from __future__ import annotations

import importlib

_FROM_GROUP = {"COMMAND_MODULES", "ExitCode", "Group", "ReportedError", "main"}


def __getattr__(name: str):
    if name not in _FROM_GROUP:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module("occlumfs.cli.group"), name)
    globals()[name] = value
    return value


__all__ = ["COMMAND_MODULES", "ExitCode", "Group", "ReportedError", "main"]
