"""``occlumfs keygen``: write a new image key file."""

from __future__ import annotations

from pathlib import Path

import click

from occlumfs.keys import write_key_file


@click.command()
@click.argument("path", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--force", is_flag=True, help="Replace an existing key file.")
def keygen(path: Path, force: bool) -> None:
    """Write a new random 128-bit key to PATH (mode 0600), in the format of
    `occlum gen-image-key`: 16 hex bytes joined by '-'."""
    write_key_file(path, overwrite=force)
    click.echo(f"wrote a new key to {path}", err=True)


COMMANDS = [keygen]
