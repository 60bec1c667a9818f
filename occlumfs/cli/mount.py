"""``occlumfs mount`` and ``occlumfs umount``."""

from __future__ import annotations

from pathlib import Path

import click

from occlumfs.errors import NotFoundError, UsageError
from occlumfs.fs import Filesystem
from occlumfs.keys import load_key_file

# occlumfs.mount pulls in pyfuse3 and trio (~0.4 s): imported by the two
# commands that serve or unmount, so every other command starts fast.

TYPES = ("image", "sefs", "mem")


def detect_type(source: Path) -> str:
    from occlumfs.merkle import is_image_file
    from occlumfs.sefs import is_sefs_dir

    if source.is_dir() and is_sefs_dir(source):
        return "sefs"
    if source.is_file() and is_image_file(source):
        return "image"
    raise UsageError(f"{source}: neither an occlumfs image nor a SEFS directory; give --type")


def open_filesystem(
    kind: str,
    source: Path,
    *,
    digest: str | None,
    key_file: Path | None,
    passphrase_file: Path | None,
    read_only: bool,
    state_dir: Path | None,
    accept_new_store: bool = False,
) -> Filesystem:
    key = load_key_file(key_file) if key_file else None
    if kind == "image":
        from occlumfs.merkle import open_image_fs

        if digest is None:
            click.echo(
                f"occlumfs: warning: no --digest given; {source} is verified against the "
                "digest it carries, so nothing pins which image this is",
                err=True,
            )
        return open_image_fs(source, digest=digest, key=key)
    if kind == "sefs":
        import sys

        from occlumfs.sefs import open_sefs_fs

        passphrase = None
        if key is None and passphrase_file is None and sys.stdin.isatty():
            passphrase = click.prompt("Passphrase", hide_input=True, err=True).encode()
        return open_sefs_fs(
            source,
            key=key,
            passphrase_file=passphrase_file,
            passphrase=passphrase,
            read_only=read_only,
            state_dir=state_dir,
            accept_new_store=accept_new_store,
        )
    from occlumfs.fs import ROOT_INO
    from occlumfs.memfs import MemFS
    from occlumfs.treecopy import copy_tree_into

    fs = MemFS(name=f"memfs:{source}")
    if source.is_dir():
        copy_tree_into(fs, ROOT_INO, source)
    elif source.exists():
        raise UsageError(f"{source}: a memory filesystem starts from a directory, or empty")
    return fs


@click.command()
@click.argument("source", type=click.Path(path_type=Path))
@click.argument("mountpoint", type=click.Path(path_type=Path))
@click.option(
    "-t",
    "--type",
    "kind",
    type=click.Choice(TYPES),
    help=(
        "What SOURCE is; detected when omitted. 'mem' is a scratch in-memory filesystem "
        "holding a copy of SOURCE when it is a directory, empty when SOURCE does not exist."
    ),
)
@click.option("--digest", help="Image digest to pin (sha256:...); refuse any other image.")
@click.option(
    "--key-file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Key file (from 'occlumfs keygen') for an encrypted image or a SEFS.",
)
@click.option(
    "--passphrase-file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="File whose first line is the SEFS passphrase.",
)
@click.option("--ro", "read_only", is_flag=True, help="Mount read-only.")
@click.option(
    "--state-dir",
    type=click.Path(path_type=Path, file_okay=False),
    help="Where SEFS keeps its trusted rollback state (outside SOURCE).",
)
@click.option(
    "--accept-new-store",
    is_flag=True,
    help="Trust a SEFS whose id differs from the one last seen at SOURCE (replaced on purpose).",
)
@click.option("-f", "--foreground", is_flag=True, help="Serve in the foreground until unmounted.")
@click.option(
    "--log-file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Server log (default: stderr in the foreground, a file in the runtime dir otherwise).",
)
@click.option("--debug", is_flag=True, help="Log every request.")
def mount(
    source: Path,
    mountpoint: Path,
    kind: str | None,
    digest: str | None,
    key_file: Path | None,
    passphrase_file: Path | None,
    read_only: bool,
    state_dir: Path | None,
    accept_new_store: bool,
    foreground: bool,
    log_file: Path | None,
    debug: bool,
) -> None:
    """Mount SOURCE (an image file or a SEFS directory) at MOUNTPOINT.

    Returns once the mount is ready; the server runs in the background until
    'occlumfs umount MOUNTPOINT', SIGINT or SIGTERM.
    """
    if kind != "mem" and not source.exists():
        raise NotFoundError(f"{source} does not exist")
    if kind is None:
        kind = detect_type(source)
    fs = open_filesystem(
        kind,
        source,
        digest=digest,
        key_file=key_file,
        passphrase_file=passphrase_file,
        read_only=read_only,
        state_dir=state_dir,
        accept_new_store=accept_new_store,
    )
    from occlumfs.mount import serve

    serve(fs, mountpoint, foreground=foreground, log_file=log_file, debug=debug)


@click.command("umount")
@click.argument("mountpoint", type=click.Path(path_type=Path))
@click.option(
    "-z",
    "--lazy",
    is_flag=True,
    help="Detach now even if the mount is busy; the server exits once the last open "
    "file in it is closed (not waited for).",
)
def umount_command(mountpoint: Path, lazy: bool) -> None:
    """Unmount MOUNTPOINT and wait for its server to commit and exit."""
    from occlumfs.mount import umount

    umount(mountpoint, lazy=lazy)


COMMANDS = [mount, umount_command]
