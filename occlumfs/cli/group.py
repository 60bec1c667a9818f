"""The ``occlumfs`` click group: parse, call the library, print.

Each command group has its own module; this one builds the group and maps
library errors to one line on stderr and a documented exit code (docs/cli.md,
the lines themselves in :mod:`occlumfs.cli.quick`).
"""

from __future__ import annotations

import importlib
import logging
import sys

import click

from occlumfs import __version__
from occlumfs.cli.quick import reportable
from occlumfs.errors import ExitCode, OcclumfsError


class ReportedError(click.ClickException):
    """A library error, shown as ``occlumfs: error: <message>`` with its exit code."""

    def __init__(self, error: OcclumfsError) -> None:
        super().__init__(str(error))
        self.exit_code = error.exit_code

    def show(self, file=None) -> None:
        click.echo(f"{self.prog}: error: {self.format_message()}", err=True)

    prog = "occlumfs"


class Group(click.Group):
    """A click group whose commands report OcclumfsError without a traceback."""

    prog = "occlumfs"

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            click.echo(f"{self.prog}: interrupted", err=True)
            sys.exit(130)
        except (click.ClickException, click.exceptions.Exit, click.Abort, SystemExit):
            raise
        except Exception as exc:
            reported = ReportedError(reportable(exc))
            reported.prog = self.prog
            raise reported from None


# Where each top-level command lives: a command imports its module (and what
# that needs: cryptography, pyfuse3, SEFS) only when it runs, so `occlumfs
# mkimage` does not pay for `mount` (start-up is a visible share of building a
# small tree). tests/merkle/test_merkle_cli.py checks this table against the modules.
COMMAND_MODULES = {
    "mount": "mount",
    "umount": "mount",
    "mkimage": "image",
    "digest": "image",
    "verify": "image",
    "ls": "image",
    "cat": "image",
    "stat": "image",
    "sefs": "sefs",
    "fsck": "sefs",
    "keygen": "keys",
    "commit": "union",
    "union": "union",
}


class _LazyGroup(Group):
    """The top-level group: loads a command's module on first use.

    ``commands`` (all of them, as click and the tests walk them) loads every
    module; resolving one command by name loads only its own.
    """

    def __init__(self, *args, **kwargs) -> None:
        self._unloaded = set(COMMAND_MODULES.values())
        super().__init__(*args, **kwargs)

    @property
    def commands(self) -> dict[str, click.Command]:
        for module in sorted(self._unloaded):
            self._load(module)
        return self._commands

    @commands.setter
    def commands(self, value: dict[str, click.Command]) -> None:
        self._commands = value

    def _load(self, module: str) -> None:
        if module not in self._unloaded:
            return
        self._unloaded.discard(module)
        for command in importlib.import_module(f"occlumfs.cli.{module}").COMMANDS:
            self._commands[command.name] = command

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        module = COMMAND_MODULES.get(cmd_name)
        if module is not None:
            self._load(module)
        return self._commands.get(cmd_name)


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="occlumfs")
@click.option("-v", "--verbose", is_flag=True, help="Log what is being done to stderr.")
def main(verbose: bool) -> None:
    """Verified image layers, an encrypted writable filesystem, and their union, over FUSE."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="occlumfs: %(levelname)s: %(message)s",
    )


__all__ = ["COMMAND_MODULES", "ExitCode", "Group", "ReportedError", "main"]
