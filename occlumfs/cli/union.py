"""The union's options of ``occlumfs mount``: layers below, one upper (docs/unionfs.md)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import click

from occlumfs.errors import UsageError

_FILE = click.Path(path_type=Path, dir_okay=False)


def union_options(command: Callable) -> Callable:
    """``--lower`` (repeated, bottom first), ``--lower-key-file`` (repeated) and ``--upper``."""
    command = click.option(
        "--upper",
        type=click.Path(path_type=Path, file_okay=False),
        help="Union: the SEFS store taking every change; a missing or empty directory "
        "becomes a new store under --key-file/--passphrase-file.",
    )(command)
    command = click.option(
        "--lower-key-file",
        "lower_key_files",
        multiple=True,
        type=_FILE,
        help="Union: key of an encrypted --lower; one for all, or one per --lower in order.",
    )(command)
    return click.option(
        "--lower",
        "lowers",
        multiple=True,
        type=_FILE,
        help="Union: a read-only image layer, repeated bottom first (implies --type union).",
    )(command)


def union_arguments(
    source: Path,
    mountpoint: Path | None,
    kind: str | None,
    digests: tuple[str, ...],
    lowers: tuple[Path, ...],
    lower_key_files: tuple[Path, ...],
    upper: Path | None,
) -> tuple[Path, Path, str | None, list]:
    """(source, mountpoint, kind, lowers) from the command line, checked.

    A union takes its upper from --upper with MOUNTPOINT alone, or as SOURCE.
    """
    if lowers and kind is None:
        kind = "union"
    if kind != "union":
        unused = [
            name
            for name, given in (
                ("--lower", lowers),
                ("--lower-key-file", lower_key_files),
                ("--upper", upper),
            )
            if given
        ]
        if unused:
            raise UsageError(f"{', '.join(unused)}: only for a union (--type union)")
        if len(digests) > 1:
            raise UsageError("one --digest pins an image; several are for a union's lowers")
        if mountpoint is None:
            raise UsageError("missing MOUNTPOINT (occlumfs mount SOURCE MOUNTPOINT)")
        return source, mountpoint, kind, []
    if mountpoint is None:
        if upper is None:
            raise UsageError("a union needs its upper: --upper DIR")
        source, mountpoint = upper, source
    elif upper is not None:
        raise UsageError("give the upper once: --upper DIR or SOURCE, not both")
    from occlumfs.unionfs import lowers_from_options

    return source, mountpoint, kind, lowers_from_options(lowers, digests, lower_key_files)
