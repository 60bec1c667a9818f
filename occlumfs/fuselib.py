"""pyfuse3, imported without loading trio: every module of ours takes it from here.

pyfuse3 imports trio when it is imported, and trio costs a server ~8 MB of
memory (a third of an idle SEFS server) and ~0.1 s of start-up, though our
servers never run it: :class:`occlumfs.requestloop.RequestLoop` stands in
for it (pyfuse3 finds its event loop in ``pyfuse3.trio``). So pyfuse3 is
imported with a placeholder in ``sys.modules["trio"]`` that loads the real
trio on first use of any of its names, and the placeholder is taken out of
``sys.modules`` straight after, so that a later ``import trio`` anywhere
gets the real module. A process that imported trio before gets it as usual.
"""

from __future__ import annotations

import importlib
import sys
import types


class _TrioOnFirstUse(types.ModuleType):
    """Stands for trio inside pyfuse3 until a name of it is used."""

    def __getattr__(self, name: str) -> object:
        if name.startswith("__"):  # import machinery probing: no need for trio
            raise AttributeError(name)
        return getattr(importlib.import_module("trio"), name)


def _import_pyfuse3() -> types.ModuleType:
    if "pyfuse3" in sys.modules or "trio" in sys.modules:
        return importlib.import_module("pyfuse3")
    sys.modules["trio"] = _TrioOnFirstUse("trio")
    try:
        return importlib.import_module("pyfuse3")
    finally:
        del sys.modules["trio"]


pyfuse3 = _import_pyfuse3()
