"""The union's options of ``occlumfs mount``: layers below, one upper (docs/unionfs.md)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import click

from occlumfs.cli.options import read_secret, secret_options, state_dir_option
from occlumfs.errors import UsageError

_FILE = click.Path(path_type=Path, dir_okay=False)


def _union_options(lower_help: str, upper_help: str) -> Callable:
    """``--lower`` (repeated, bottom first), ``--lower-key-file`` (repeated) and ``--upper``."""

    def decorate(command: Callable) -> Callable:
        command = click.option(
            "--upper", type=click.Path(path_type=Path, file_okay=False), help=upper_help
        )(command)
        command = click.option(
            "--lower-key-file",
            "lower_key_files",
            multiple=True,
            type=_FILE,
            help="Union: key of an encrypted --lower; one for all, or one per --lower in order.",
        )(command)
        return click.option("--lower", "lowers", multiple=True, type=_FILE, help=lower_help)(
            command
        )

    return decorate


union_options = _union_options(
    "Union: a read-only image layer, repeated bottom first (implies --type union).",
    "Union: the SEFS store taking every change; a missing or empty directory "
    "becomes a new store under --key-file/--passphrase-file.",
)
# commit reads an existing upper and has no --type.
_commit_union_options = _union_options(
    "A read-only image layer the upper was made over, repeated bottom first.",
    "The union's upper: an existing SEFS store (opened read-only).",
)


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
@_commit_union_options
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


@click.group("union")
def union_group() -> None:
    """Maintain a union's upper layer."""


@union_group.command("rebase")
@click.option(
    "--upper",
    type=click.Path(path_type=Path, file_okay=False),
    required=True,
    help="The union's upper (a SEFS store).",
)
@click.option(
    "--from",
    "old",
    multiple=True,
    type=_FILE,
    required=True,
    help="An image the upper was made over, repeated bottom first.",
)
@click.option(
    "--to",
    "new",
    multiple=True,
    type=_FILE,
    required=True,
    help="An image to move the upper onto, repeated bottom first.",
)
@click.option(
    "--lower-key-file",
    "lower_key_files",
    multiple=True,
    type=_FILE,
    help="Key of encrypted images: one for all, or one per --from then --to image.",
)
@secret_options("Key file of the upper's SEFS store.", "File whose first line is its passphrase.")
@state_dir_option("Where the upper's SEFS keeps its trusted rollback state.")
def rebase(
    upper: Path,
    old: tuple[Path, ...],
    new: tuple[Path, ...],
    lower_key_files: tuple[Path, ...],
    key_file: Path | None,
    passphrase_file: Path | None,
    state_dir: Path | None,
) -> None:
    """Move the upper made over the --from images onto the --to images.

    Data the upper still reads from the old images (metadata-only copies) is
    copied into it first; deletions, opaque directories and renamed
    directories carry over by path. Inode numbers of copied entries change.
    """
    from occlumfs.merkle import open_image_fs
    from occlumfs.unionfs import lowers_from_options, open_union
    from occlumfs.unionfs.rebase import rebase_upper

    keys = list(lower_key_files)
    if len(keys) not in (0, 1, len(old) + len(new)):
        raise UsageError(
            f"{len(keys)} --lower-key-file for {len(old) + len(new)} images: "
            "give one for all, or one per --from then --to image"
        )
    old_keys, new_keys = (keys, keys) if len(keys) <= 1 else (keys[: len(old)], keys[len(old) :])
    new_layers = lowers_from_options(new, (), new_keys)
    new_digests = []
    for layer in new_layers:  # each must open (right key, sound header) before anything changes
        image = open_image_fs(layer.path, digest=None, key=layer.key)
        new_digests.append(image.digest)
        image.close()
    secret = read_secret(key_file, passphrase_file)
    fs = open_union(
        lowers_from_options(old, (), old_keys),
        upper,
        key=secret.key,
        passphrase=secret.passphrase,
        state_dir=state_dir,
    )
    counts = rebase_upper(fs, new_digests)
    click.echo(
        f"rebased {upper}: {counts['data_copied']} file(s) copied in from the old images, "
        f"now over {len(new_digests)} image(s)"
    )


COMMANDS = [commit, union_group]
