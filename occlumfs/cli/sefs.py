"""SEFS commands: ``occlumfs sefs create|info|passwd`` and ``occlumfs fsck``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from occlumfs.cli.options import read_secret, secret_options, state_dir_option
from occlumfs.errors import ExitCode

if TYPE_CHECKING:
    from occlumfs.sefs import Credential

# occlumfs.sefs is imported by the commands that use it: every other command
# (mkimage above all) starts faster without it.

_ACCEPT_HELP = "Trust a SEFS whose id differs from the one last seen at this path (replaced)."


def _credential(
    key_file: Path | None,
    passphrase_file: Path | None,
    what: str = "passphrase",
    confirm: bool = False,
    prefix: str = "",
) -> Credential:
    from occlumfs.sefs import Credential

    secret = read_secret(key_file, passphrase_file, what=what, confirm=confirm, prefix=prefix)
    return Credential(key=secret.key, passphrase=secret.passphrase)


@click.group("sefs")
def sefs() -> None:
    """Create and manage SEFS directories (encrypted, writable; mount with 'occlumfs mount')."""


@sefs.command("create")
@click.argument("directory", type=click.Path(path_type=Path, file_okay=False))
@secret_options(
    "Protect the filesystem with this key file.",
    "...or with the passphrase on this file's first line.",
)
@state_dir_option()
def create(
    directory: Path, key_file: Path | None, passphrase_file: Path | None, state_dir: Path | None
) -> None:
    """Create an empty SEFS in DIRECTORY (absent or empty).

    Without --key-file or --passphrase-file, asks for a passphrase twice on a terminal.
    """
    cred = _credential(key_file, passphrase_file, "passphrase", confirm=True)
    # SIGTERM and SIGHUP unwind as Ctrl-C does (exit 130), so the half-made
    # store is removed: the rule mkimage keeps, from one place.
    from occlumfs.interrupts import ended_like_ctrl_c
    from occlumfs.sefs import create_sefs

    with ended_like_ctrl_c():
        config = create_sefs(directory, cred, state_dir=state_dir)
    click.echo(f"created SEFS {directory} (id {config['fs_id']})", err=True)


@sefs.command("info")
@click.argument("directory", type=click.Path(path_type=Path, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def info(directory: Path, as_json: bool) -> None:
    """Show DIRECTORY's public facts: version, sizes, root, commit counter. Needs no key."""
    from occlumfs.sefs import describe_sefs

    facts = describe_sefs(directory)
    if as_json:
        click.echo(json.dumps(facts, indent=2))
        return
    for name, value in facts.items():
        click.echo(f"{name}: {value}")


@sefs.command("passwd")
@click.argument("directory", type=click.Path(path_type=Path, file_okay=False))
@secret_options("The current key file.", "The current passphrase file.")
@secret_options("The new key file.", "The new passphrase file.", prefix="new-")
def passwd(
    directory: Path,
    key_file: Path | None,
    passphrase_file: Path | None,
    new_key_file: Path | None,
    new_passphrase_file: Path | None,
) -> None:
    """Change the key or passphrase of DIRECTORY (re-wraps the master key; no data is rewritten).

    Asks on a terminal for whatever is not given as a file.
    """
    old = _credential(key_file, passphrase_file, "current passphrase")
    new = _credential(
        new_key_file, new_passphrase_file, "new passphrase", confirm=True, prefix="new-"
    )
    from occlumfs.sefs import change_credential

    change_credential(directory, old, new)
    click.echo(f"changed the key of {directory}", err=True)


@click.command("fsck")
@click.argument("directory", type=click.Path(path_type=Path, file_okay=False))
@secret_options("Key file of the filesystem.", "Passphrase file of the filesystem.")
@state_dir_option("Trusted state directory, to check for whole-filesystem rollback.")
@click.option("--accept-new-store", is_flag=True, help=_ACCEPT_HELP)
def fsck(
    directory: Path,
    key_file: Path | None,
    passphrase_file: Path | None,
    state_dir: Path | None,
    accept_new_store: bool,
) -> None:
    """Check a SEFS DIRECTORY completely: every page, entry, link count and data block.

    Prints each problem with its path. Exit 0 when clean, 26 when problems were found.
    """
    cred = _credential(key_file, passphrase_file, "passphrase")
    from occlumfs.sefs.fsck import fsck as fsck_sefs

    problems = fsck_sefs(
        directory,
        key=cred.key,
        passphrase=cred.passphrase,
        state_dir=state_dir,
        accept_new_store=accept_new_store,
    )
    for line in problems:
        click.echo(line)
    if problems:
        click.echo(f"occlumfs: {len(problems)} problem(s) in {directory}", err=True)
        sys.exit(ExitCode.FSCK)
    click.echo(f"{directory}: clean", err=True)


COMMANDS = [sefs, fsck]
