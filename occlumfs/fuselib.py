"""pyfuse3, imported without loading trio: every module of ours takes it from here.

pyfuse3 imports trio when it is imported, and trio costs a server ~8 MB of
memory (a third of an idle SEFS server) and ~0.1 s of start-up, though our
servers never run it: :class:`occlumfs.requestloop.RequestLoop` stands in
for it (pyfuse3 finds its event loop in ``pyfuse3.trio``). So pyfuse3 is
imported with a placeholder in ``sys.modules["trio"]`` that loads the real
trio on first use of any of its names, and the placeholder is taken out of
``sys.modules`` straight after, so that a later ``import trio`` anywhere
gets the real module. A process that imported trio before gets it as usual.

pyfuse3 also reads its own version through ``importlib.metadata`` when it is
imported, which pulls in email, zipfile, csv and socket (~1.7 MB more); it is
answered from the ``Version:`` line of pyfuse3's installed metadata instead
(``importlib.metadata`` is likewise loaded for real by whoever imports it later).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from pathlib import Path


class _TrioOnFirstUse(types.ModuleType):
    """Stands for trio inside pyfuse3 until a name of it is used."""

    def __getattr__(self, name: str) -> object:
        if name.startswith("__"):  # import machinery probing: no need for trio
            raise AttributeError(name)
        return getattr(importlib.import_module("trio"), name)


class _PackageNotFoundError(ModuleNotFoundError):
    pass


def _version(name: str) -> str:
    """A distribution's version from its dist-info beside the package, email parser-free."""
    spec = importlib.util.find_spec(name)
    if spec is not None and spec.submodule_search_locations:
        site = Path(next(iter(spec.submodule_search_locations))).parent
        for meta in sorted(site.glob(f"{name}-*.dist-info/METADATA")):
            with open(meta, encoding="utf-8") as f:
                for line in f:
                    if line.startswith("Version:"):
                        return line.split(":", 1)[1].strip()
                    if not line.strip():
                        break
    raise _PackageNotFoundError(name)


def _import_pyfuse3() -> types.ModuleType:
    if "pyfuse3" in sys.modules:
        return sys.modules["pyfuse3"]
    stand_ins: dict[str, types.ModuleType] = {}
    if "trio" not in sys.modules:
        stand_ins["trio"] = _TrioOnFirstUse("trio")
    if "importlib.metadata" not in sys.modules:
        metadata = stand_ins["importlib.metadata"] = types.ModuleType("importlib.metadata")
        metadata.PackageNotFoundError = _PackageNotFoundError  # type: ignore[attr-defined]
        metadata.version = _version  # type: ignore[attr-defined]
    sys.modules.update(stand_ins)
    try:
        return importlib.import_module("pyfuse3")
    finally:
        for name in stand_ins:
            del sys.modules[name]


pyfuse3 = _import_pyfuse3()
