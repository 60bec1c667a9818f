"""The union's options of ``occlumfs mount``: layers below, one upper (docs/unionfs.md)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import click

from occlumfs.cli.options import read_secret, secret_options, state_dir_option
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


@click.command("commit")
@click.argument("new_image", type=_FILE)
@union_options
@click.option(
    "--digest",
    "digests",
    multiple=True,
    help="Pin each --lower to a digest, one per --lower in the same order.",
)
@secret_options("Key file of the upper's SEFS store.", "File whose first line is its passphrase.")
@state_dir_option("Where the upper's SEFS keeps its trusted rollback state.")
@click.option(
    "--image-key-file",
    type=_FILE,
    help="Encrypt the new image with this key (from 'occlumfs keygen').",
)
@click.option("--flatten", is_flag=True, help="Write the whole merged view as one image.")
def commit(
    new_image: Path,
    lowers: tuple[Path, ...],
    lower_key_files: tuple[Path, ...],
    upper: Path | None,
    digests: tuple[str, ...],
    key_file: Path | None,
    passphrase_file: Path | None,
    state_dir: Path | None,
    image_key_file: Path | None,
    flatten: bool,
) -> None:
    """Write a union's upper (--upper over its --lower images) as image NEW_IMAGE.

    Stacked on the same lowers, the new image shows exactly the union's view:
    deletions are whiteouts, replaced directories opaque (docs/unionfs.md).
    With --flatten it holds the whole view alone. The upper is read through
    the filesystem, never decrypted onto the disk. Prints the digest.
    """
    from occlumfs.keys import load_key_file
    from occlumfs.unionfs import lowers_from_options, open_union
    from occlumfs.unionfs.commit import commit_layer

    if upper is None:
        raise UsageError("commit needs the union's upper: --upper DIR")
    layers = lowers_from_options(lowers, digests, lower_key_files)
    image_key = load_key_file(image_key_file) if image_key_file else None
    secret = read_secret(key_file, passphrase_file)
    fs = open_union(
        layers,
        upper,
        key=secret.key,
        passphrase=secret.passphrase,
        state_dir=state_dir,
        read_only=True,
    )
    click.echo(commit_layer(fs, new_image, key=image_key, flatten=flatten))


COMMANDS = [commit]
