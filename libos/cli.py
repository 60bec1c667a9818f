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
    from libos.control import describe
    from libos.instance import Instance
    from libos.run import running_pid

    instance = Instance.find()
    click.echo(build_status(instance))
    running = describe(instance)  # a started instance
    if running is None:
        pid = running_pid(instance)  # occlum run, occlum mount
        running = None if pid is None else f"running (pid {pid})"
    if running is not None:
        click.echo(running)


@main.command()
@click.option(
    "--image-key",
    type=PATH,
    help="The key the instance was built with (default: the one this machine kept at build).",
)
def start(image_key: Path | None) -> None:
    """Mount the instance and keep its sandbox up for occlum exec; return when ready."""
    from libos.control import start as do_start
    from libos.instance import Instance

    click.echo(do_start(Instance.find(), image_key), err=True)


@main.command(
    "exec", context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False}
)
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def exec_command(command: tuple[str, ...]) -> None:
    """Run COMMAND (an absolute path inside the instance, and its arguments) in the
    started instance with this terminal's stdin/stdout/stderr; exit with its status.

    \b
    Options, before COMMAND:
      -w, --cwd DIR          run in DIR (absolute, inside the instance; default /;
                             also --workdir)
      -e, --env NAME[=VALUE] set NAME (only names in env.untrusted of Occlum.json);
                             NAME alone passes this shell's value"""
    from libos.instance import Instance
    from libos.protocol import exec_program

    sys.exit(exec_program(str(Instance.find().root), list(command)))


@main.command()
@click.option(
    "-t",
    "--timeout",
    type=click.FloatRange(min=0),
    default=3.0,
    show_default=True,
    help="Seconds the programs get after SIGTERM before SIGKILL.",
)
def stop(timeout: float) -> None:
    """SIGTERM every program, SIGKILL what is left after the timeout, commit, unmount."""
    from libos.control import stop as do_stop
    from libos.instance import Instance

    do_stop(Instance.find(), timeout)
    click.echo("occlum: stopped; the writable layer is committed", err=True)


@main.command()
def kill() -> None:
    """SIGKILL every program now, then commit and unmount."""
    from libos.control import stop as do_stop
    from libos.instance import Instance

    do_stop(Instance.find(), kill=True)
    click.echo("occlum: killed; the writable layer is committed", err=True)


@main.command("mount")
@click.argument("mountpoint", type=PATH)
@click.option("--rw", is_flag=True, help="Writable (changes are committed on unmount).")
@click.option(
    "--image-key",
    type=PATH,
    help="The key the instance was built with (default: the one this machine kept at build).",
)
def mount_command(mountpoint: Path, rw: bool, image_key: Path | None) -> None:
    """Mount the instance's / (read-only unless --rw) at MOUNTPOINT for inspection;
    'occlumfs umount MOUNTPOINT' ends it."""
    from libos.instance import Instance
    from libos.ship import mount_instance

    mount_instance(Instance.find(), mountpoint, rw=rw, image_key=image_key)
    click.echo(f"occlum: mounted at {mountpoint}; 'occlumfs umount {mountpoint}' ends it", err=True)


@main.command()
@click.argument("output", required=False, type=PATH)
@click.option("--with-run", is_flag=True, help="Include the writable layer (run/).")
def package(output: Path | None, with_run: bool) -> None:
    """Write OUTPUT (default: INSTANCE.tar.gz here), a reproducible tarball of the
    built instance without image/; unpacked elsewhere, it runs with the image key."""
    from libos.instance import Instance
    from libos.ship import package as do_package

    click.echo(do_package(Instance.find(), output, with_run=with_run))


@main.command("gen-image-key")
@click.argument("path", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--force", is_flag=True, help="Replace an existing key file.")
def gen_image_key(path: Path, force: bool) -> None:
    """Write a new random image key to PATH (mode 0600), as 'occlumfs keygen' does."""
    from occlumfs.keys import write_key_file

    write_key_file(path, overwrite=force)
    click.echo(f"wrote a new key to {path}", err=True)


if __name__ == "__main__":  # python -m libos.cli: the installed command, click included
    main()
