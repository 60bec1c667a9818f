"""SEFS commands: ``occlumfs sefs create|info|passwd`` and ``occlumfs fsck``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from occlumfs.errors import ExitCode, UsageError
from occlumfs.keys import load_key_file
from occlumfs.sefs import Credential, change_credential, create_sefs, credential, describe_sefs
from occlumfs.sefs.fsck import fsck as fsck_sefs

_KEY_FILE = click.Path(path_type=Path, dir_okay=False)
_ACCEPT_HELP = "Trust a SEFS whose id differs from the one last seen at this path (replaced)."


def _prompt_passphrase(what: str, confirm: bool) -> bytes:
    if not sys.stdin.isatty():
        raise UsageError(f"no {what} given: use --key-file or --passphrase-file")
    text = click.prompt(what.capitalize(), hide_input=True, confirmation_prompt=confirm, err=True)
    if not text:
        raise UsageError("the passphrase is empty")
    return text.encode()


def _credential(
    key_file: Path | None, passphrase_file: Path | None, what: str = "key", confirm: bool = False
) -> Credential:
    if key_file is None and passphrase_file is None:
        return Credential(passphrase=_prompt_passphrase(what, confirm))
    key = load_key_file(key_file) if key_file else None
    return credential(key, passphrase_file)


@click.group("sefs")
def sefs() -> None:
    """Create and manage SEFS directories (encrypted, writable; mount with 'occlumfs mount')."""


@sefs.command("create")
@click.argument("directory", type=click.Path(path_type=Path, file_okay=False))
@click.option("--key-file", type=_KEY_FILE, help="Protect the filesystem with this key file.")
@click.option(
    "--passphrase-file", type=_KEY_FILE, help="...or with the passphrase on this file's first line."
)
@click.option(
    "--state-dir",
    type=click.Path(path_type=Path, file_okay=False),
    help="Trusted state directory (default $OCCLUMFS_STATE_DIR or ~/.local/state/occlumfs/sefs).",
)
def create(
    directory: Path, key_file: Path | None, passphrase_file: Path | None, state_dir: Path | None
) -> None:
    """Create an empty SEFS in DIRECTORY (absent or empty).

    Without --key-file or --passphrase-file, asks for a passphrase twice on a terminal.
    """
    cred = _credential(key_file, passphrase_file, "passphrase", confirm=True)
    config = create_sefs(directory, cred, state_dir=state_dir)
    click.echo(f"created SEFS {directory} (id {config['fs_id']})", err=True)


@sefs.command("info")
@click.argument("directory", type=click.Path(path_type=Path, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def info(directory: Path, as_json: bool) -> None:
    """Show DIRECTORY's public facts: version, sizes, root, commit counter. Needs no key."""
    facts = describe_sefs(directory)
    if as_json:
        click.echo(json.dumps(facts, indent=2))
        return
    for name, value in facts.items():
        click.echo(f"{name}: {value}")


@sefs.command("passwd")
@click.argument("directory", type=click.Path(path_type=Path, file_okay=False))
@click.option("--key-file", type=_KEY_FILE, help="The current key file.")
@click.option("--passphrase-file", type=_KEY_FILE, help="The current passphrase file.")
@click.option("--new-key-file", type=_KEY_FILE, help="The new key file.")
@click.option("--new-passphrase-file", type=_KEY_FILE, help="The new passphrase file.")
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
    new = _credential(new_key_file, new_passphrase_file, "new passphrase", confirm=True)
    change_credential(directory, old, new)
    click.echo(f"changed the key of {directory}", err=True)


@click.command("fsck")
@click.argument("directory", type=click.Path(path_type=Path, file_okay=False))
@click.option("--key-file", type=_KEY_FILE, help="Key file of the filesystem.")
@click.option("--passphrase-file", type=_KEY_FILE, help="Passphrase file of the filesystem.")
@click.option(
    "--state-dir",
    type=click.Path(path_type=Path, file_okay=False),
    help="Trusted state directory, to check for whole-filesystem rollback.",
)
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
