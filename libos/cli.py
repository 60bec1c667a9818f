"""The ``occlum`` command: parse, call :mod:`libos`, print. Nothing else lives here.

Errors are one line, ``occlum: error: <what and where>``, with the exit codes
of docs/cli.md (the same table as ``occlumfs``).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import click

from libos import __version__
from occlumfs.cli import Group


class OcclumGroup(Group):
    prog = "occlum"


PATH = click.Path(path_type=Path)


@click.group(cls=OcclumGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="occlum")
@click.option("-v", "--verbose", is_flag=True, help="Log what is being done to stderr.")
def main(verbose: bool) -> None:
    """Run unmodified apps on protected storage: new, build, run."""
    _log_to_stderr("occlum", logging.INFO if verbose else logging.WARNING)


def _log_to_stderr(prog: str, level: int) -> None:
    logging.basicConfig(level=level, format=f"{prog}: %(levelname)s: %(message)s")


@main.command()
@click.argument("path", type=PATH)
def new(path: Path) -> None:
    """Create a new instance directory PATH (Occlum.json, image/, build/, run/)."""
    from libos.instance import create

    instance = create(path, fresh=True)
    click.echo(f"{instance.root}: new Occlum instance")


@main.command()
def init() -> None:
    """Make the current directory an instance (Occlum.json, image/, build/, run/)."""
    from libos.instance import create

    instance = create(Path.cwd(), fresh=False)
    click.echo(f"{instance.root}: initialized Occlum instance")


def _bar(instance):
    """A progress bar over image/'s bytes when stderr is a terminal, else None."""
    if not sys.stderr.isatty():
        return None
    total = 0
    for dirpath, _dirs, files in os.walk(instance.image):
        for name in files:
            p = os.path.join(dirpath, name)
            if os.path.isfile(p) and not os.path.islink(p):
                total += os.path.getsize(p)
    return click.progressbar(length=max(total, 1), label="hashing", file=sys.stderr)


@main.command()
@click.option(
    "--sign-key",
    type=PATH,
    help="PEM private key (Ed25519 or RSA-3072). Default: a development key of this instance.",
)
@click.option(
    "--image-key",
    type=PATH,
    help="Key file (occlum gen-image-key / occlumfs keygen): encrypts the image layer "
    "and keys the writable layer.",
)
@click.option("-f", "--force", is_flag=True, help="Rebuild everything, changed or not.")
def build(sign_key: Path | None, image_key: Path | None, force: bool) -> None:
    """Build image/ into a verified image layer and sign the manifest."""
    from libos.build import build as do_build
    from libos.instance import Instance

    instance = Instance.find()
    bar = _bar(instance)
    if bar is None:
        result = do_build(instance, sign_key=sign_key, image_key=image_key, force=force)
    else:
        with bar:
            result = do_build(
                instance, sign_key=sign_key, image_key=image_key, force=force, progress=bar.update
            )
    if not result.layer_built and not result.signed:
        click.echo("nothing changed; build is up to date")
        return
    what = "built image layer" if result.layer_built else "image unchanged"
    click.echo(f"{what} {result.layer_digest}")
    click.echo(f"mrenclave {result.mrenclave}")


@main.command("print")
@click.argument("what", type=click.Choice(["mrsigner", "mrenclave"]))
def print_command(what: str) -> None:
    """Print the signer hash (mrsigner) or the measurement (mrenclave) of the build."""
    from libos.build import verify_manifest_only
    from libos.instance import Instance

    signature = verify_manifest_only(Instance.find())
    click.echo(signature.mrsigner if what == "mrsigner" else signature.mrenclave)


__all__ = ["main"]


def _copy_bom_options(command):
    command = click.option("--dry-run", is_flag=True, help="Log what would be done; do nothing.")(
        command
    )
    command = click.option(
        "-i",
        "--include-dir",
        "include_dirs",
        multiple=True,
        type=PATH,
        help="Where to find included BOM files (repeatable).",
    )(command)
    command = click.option(
        "-r", "--root", required=True, type=PATH, help="The image directory to fill."
    )(command)
    return click.option(
        "-f", "--file", "bom", required=True, type=PATH, help="The BOM (YAML) file."
    )(command)


def _copy_bom(bom: Path, root: Path, include_dirs: tuple[Path, ...], dry_run: bool) -> None:
    from libos.bom import copy_bom

    copy_bom(bom, root, list(include_dirs), dry_run=dry_run)


@main.command("copy-bom")
@_copy_bom_options
def copy_bom_subcommand(bom, root, include_dirs, dry_run) -> None:
    """Copy the files a BOM lists (with their shared libraries) into an image directory."""
    _copy_bom(bom, root, include_dirs, dry_run)


@click.command(cls=click.Command, context_settings={"help_option_names": ["-h", "--help"]})
@_copy_bom_options
def copy_bom_command(bom, root, include_dirs, dry_run) -> None:
    """Copy the files a BOM lists (with their shared libraries) into an image directory."""
    _log_to_stderr("copy_bom", logging.WARNING)
    _copy_bom(bom, root, include_dirs, dry_run)


@main.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.option(
    "--image-key",
    type=PATH,
    help="The key the instance was built with (default: the one this machine kept at build).",
)
@click.argument("program")
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def run(image_key: Path | None, program: str, args: tuple[str, ...]) -> None:
    """Run PROGRAM (an absolute path inside the instance) with ARGS; exit with its status."""
    from libos.instance import Instance
    from libos.run import run as do_run

    sys.exit(do_run(Instance.find(), program, list(args), image_key=image_key))


@main.command()
def status() -> None:
    """Say whether the instance is built, changed since its build, or running."""
    from libos.build import build_status
    from libos.instance import Instance
    from libos.run import running_pid

    instance = Instance.find()
    click.echo(build_status(instance))
    pid = running_pid(instance)
    if pid is not None:
        click.echo(f"running (pid {pid})")
