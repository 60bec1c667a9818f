"""``occlum-gcc`` and ``occlum-g++``: compilers whose output runs inside an instance.

``occlum-gcc`` is Debian's ``musl-gcc``: a dynamically linked musl program
needs only ``/lib/ld-musl-x86_64.so.1``, which ``occlum new`` puts in every
image. Debian ships no musl C++ library, so ``occlum-g++`` links with g++ and
``-static`` (glibc and libstdc++ linked in): such a binary needs nothing from
the image at all. A program that cannot be linked statically can still be
built with plain g++ and copied in with its libraries by ``copy_bom``'s autodep.
"""

from __future__ import annotations

import os
import shutil
import sys


def _exec(compiler: str, extra_front: list[str], args: list[str]) -> None:
    path = shutil.which(compiler)
    if path is None:
        print(
            f"occlum: error: {compiler} not found (Debian package: "
            f"{'musl-tools' if compiler == 'musl-gcc' else 'g++'})",
            file=sys.stderr,
        )
        sys.exit(14)
    os.execv(path, [compiler, *extra_front, *args])


def _links(args: list[str]) -> bool:
    """Whether this compiler invocation links (not -c, -S, -E, or a bare --version)."""
    return not any(a in ("-c", "-S", "-E", "-M", "-MM", "--version", "-v") for a in args)


def gcc_main() -> None:
    _exec("musl-gcc", [], sys.argv[1:])


def gxx_main() -> None:
    args = sys.argv[1:]
    _exec("g++", ["-static"] if _links(args) else [], args)


if __name__ == "__main__":  # python -m libos.toolchain gcc|g++ ARGS (as occlum-gcc / occlum-g++)
    which = sys.argv.pop(1) if len(sys.argv) > 1 else ""
    {"gcc": gcc_main, "g++": gxx_main}.get(which, lambda: sys.exit("usage: gcc|g++ ARGS"))()
