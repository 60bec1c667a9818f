"""``occlumfs mount`` and ``occlumfs umount``: parse, ask for a secret, call the library."""

from __future__ import annotations

from pathlib import Path

import click

from occlumfs.cli.options import Secret, read_secret, secret_options, state_dir_option
from occlumfs.cli.union import union_arguments, union_options
from occlumfs.errors import MountpointNotEmptyError, UsageError
from occlumfs.open import KINDS, needs_secret, open_filesystem, resolve_kind

# occlumfs.mount pulls in pyfuse3 (occlumfs/fuselib.py) and the request loop:
# imported by the two commands that serve or unmount, so every other command
# starts fast.


def _warn(message: str) -> None:
    click.echo(f"occlumfs: warning: {message}", err=True)


@click.command()
@click.argument("source", type=click.Path(path_type=Path))
@click.argument("mountpoint", type=click.Path(path_type=Path), required=False)
@click.option(
    "-t",
    "--type",
    "kind",
    type=click.Choice(list(KINDS)),
    help=(
        "What SOURCE is; detected when omitted. 'mem' is a scratch in-memory filesystem "
        "holding a copy of SOURCE when it is a directory, empty when SOURCE does not exist."
    ),
)
@click.option(
    "--digest",
    "digests",
    multiple=True,
    help="Image digest to pin (sha256:...); refuse any other image. A union takes one per "
    "--lower, in the same order.",
)
@union_options
@secret_options(
    "Key file (from 'occlumfs keygen') for an encrypted image or a SEFS.",
    "File whose first line is the SEFS passphrase.",
)
@click.option("--ro", "read_only", is_flag=True, help="Mount read-only.")
@state_dir_option("Where SEFS keeps its trusted rollback state (outside SOURCE).")
@click.option(
    "--nonempty",
    is_flag=True,
    help="Mount even if MOUNTPOINT holds files (they are hidden until the unmount).",
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
    digests: tuple[str, ...],
    lowers: tuple[Path, ...],
    lower_key_files: tuple[Path, ...],
    upper: Path | None,
    key_file: Path | None,
    passphrase_file: Path | None,
    read_only: bool,
    state_dir: Path | None,
    nonempty: bool,
    accept_new_store: bool,
    foreground: bool,
    log_file: Path | None,
    debug: bool,
) -> None:
    """Mount SOURCE (an image file or a SEFS directory) at MOUNTPOINT.

    A union ('--type union', or any --lower) mounts its --lower images under
    the SEFS store --upper (or SOURCE): 'occlumfs mount --lower IMG --upper DIR
    --key-file K MOUNTPOINT'. A missing or empty upper becomes a new store.

    Returns once the mount is ready; the server runs in the background until
    'occlumfs umount MOUNTPOINT', SIGINT or SIGTERM. A secret a SEFS needs and
    that is not given as a file is asked for on a terminal.
    """
    from occlumfs.mount import check_mountpoint, serve

    source, mountpoint, kind, layers = union_arguments(
        source, mountpoint, kind, digests, lowers, lower_key_files, upper
    )
    digest = None if kind == "union" else (digests[0] if digests else None)
    kind = resolve_kind(kind, source)
    if digest is not None and kind != "image":  # silently unchecked, it would look pinned
        raise UsageError(f"--digest pins an image; {source} is mounted as {kind}")
    secret = read_secret(key_file, passphrase_file, ask=False)
    try:  # before asking for a passphrase; serve checks again
        check_mountpoint(mountpoint, nonempty=nonempty)
    except MountpointNotEmptyError as exc:
        raise MountpointNotEmptyError(f"{exc}; give --nonempty to mount over it") from None
    if kind in ("sefs", "union"):
        from occlumfs.sefs.state import refuse_state_dir_under

        refuse_state_dir_under(state_dir, mountpoint)
    if secret == Secret() and needs_secret(kind):
        secret = read_secret(None, None)
    fs = open_filesystem(
        kind,
        source,
        digest=digest,
        key=secret.key,
        passphrase=secret.passphrase,
        read_only=read_only,
        state_dir=state_dir,
        warn=_warn,
        lowers=layers,
        accept_new_store=accept_new_store,
    )
    serve(fs, mountpoint, foreground=foreground, log_file=log_file, debug=debug, nonempty=nonempty)


class _Unlooked(click.ParamType):
    """A path taken as typed: click.Path would stat it, and a stat of a
    mountpoint asks its server, which may be stopped or gone."""

    name = "path"

    def convert(self, value, param, ctx) -> Path:
        return Path(value)


@click.command("umount")
@click.argument("mountpoint", type=_Unlooked())
@click.option(
    "-z",
    "--lazy",
    is_flag=True,
    help="Detach now even if the mount is busy; the server exits once the last open "
    "file in it is closed (not waited for, its final commit not checked).",
)
def umount_command(mountpoint: Path, lazy: bool) -> None:
    """Unmount MOUNTPOINT and wait for its server to commit and exit.

    Exits 16 when the mount is busy (an open file, a working directory in it;
    see --lazy), and 17 when the final commit failed or the server exited
    without confirming it: changes not synced before the unmount were not saved.
    """
    from occlumfs.mount import umount

    umount(mountpoint, lazy=lazy, warn=_warn)


COMMANDS = [mount, umount_command]
