"""Options and prompting shared by the commands that take secrets.

One set of decorators for ``--key-file``/``--passphrase-file``/``--state-dir``
and one rule for asking: a secret not given as a file is asked for on a
terminal, and without a terminal it is a usage error naming the options.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import click

from occlumfs.errors import UsageError
from occlumfs.keys import load_key_file

_FILE = click.Path(path_type=Path, dir_okay=False)
_DIR = click.Path(path_type=Path, file_okay=False)


def secret_options(
    key_help: str = "Key file (from 'occlumfs keygen').",
    passphrase_help: str = "File whose first line is the passphrase.",
    prefix: str = "",
) -> Callable:
    """``--{prefix}key-file`` and ``--{prefix}passphrase-file``."""

    def decorate(command: Callable) -> Callable:
        command = click.option(f"--{prefix}passphrase-file", type=_FILE, help=passphrase_help)(
            command
        )
        return click.option(f"--{prefix}key-file", type=_FILE, help=key_help)(command)

    return decorate


def state_dir_option(
    help: str = (
        "Trusted state directory, outside the SEFS directory "
        "(default $OCCLUMFS_STATE_DIR, else $XDG_STATE_HOME/occlumfs/sefs, else "
        "~/.local/state/occlumfs/sefs)."
    ),
) -> Callable:
    return click.option("--state-dir", type=_DIR, help=help)


def prompt_passphrase(what: str = "passphrase", confirm: bool = False, prefix: str = "") -> bytes:
    """Ask for a passphrase on the terminal; a usage error when there is none."""
    if not sys.stdin.isatty():
        raise UsageError(f"no {what} given: use --{prefix}key-file or --{prefix}passphrase-file")
    text = click.prompt(what.capitalize(), hide_input=True, confirmation_prompt=confirm, err=True)
    if not text:
        raise UsageError(f"the {what} is empty")
    return text.encode()


@dataclass(frozen=True)
class Secret:
    """What the user gave: a key, a passphrase, or (not asked for) neither."""

    key: bytes | None = None
    passphrase: bytes | None = None


def read_secret(
    key_file: Path | None,
    passphrase_file: Path | None,
    *,
    what: str = "passphrase",
    confirm: bool = False,
    ask: bool = True,
    prefix: str = "",
) -> Secret:
    """The secret named by the options; asked for when none is given and ``ask``."""
    from occlumfs.sefs.keys import read_passphrase_file

    if key_file is not None and passphrase_file is not None:
        raise UsageError(f"give one of --{prefix}key-file or --{prefix}passphrase-file, not both")
    if key_file is not None:
        return Secret(key=load_key_file(key_file))
    if passphrase_file is not None:
        return Secret(passphrase=read_passphrase_file(passphrase_file))
    return Secret(passphrase=prompt_passphrase(what, confirm, prefix)) if ask else Secret()
