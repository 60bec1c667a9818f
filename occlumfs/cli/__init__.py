"""The ``occlumfs`` command: parse, call the library, print. Nothing else lives here.

Each command group has its own module; this one builds the group and maps
library errors to one line on stderr and a documented exit code (docs/cli.md).
"""

from __future__ import annotations

import logging
import sys

import click

from occlumfs import __version__
from occlumfs.errors import ExitCode, NotFoundError, OcclumfsError


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
        except OcclumfsError as exc:
            reported = ReportedError(exc)
            reported.prog = self.prog
            raise reported from None
        except OSError as exc:
            # The host refused something (a path, a permission) that the
            # library did not foresee: still one line, never a traceback.
            logging.getLogger("occlumfs").info("host error", exc_info=True)  # shown with -v
            where = f"{exc.filename}: " if exc.filename else ""
            kind = NotFoundError if isinstance(exc, FileNotFoundError) else OcclumfsError
            reported = ReportedError(kind(f"{where}{exc.strerror or exc}"))
            reported.prog = self.prog
            raise reported from None
        except KeyboardInterrupt:
            click.echo(f"{self.prog}: interrupted", err=True)
            sys.exit(130)
        except (click.ClickException, click.exceptions.Exit, click.Abort, SystemExit):
            raise
        except Exception as exc:
            # A bug, not a user mistake: still one line; the traceback with -v.
            logging.getLogger("occlumfs").info("internal error", exc_info=True)
            reported = ReportedError(
                OcclumfsError(f"internal error: {type(exc).__name__}: {exc} (-v shows where)")
            )
            reported.prog = self.prog
            raise reported from None


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="occlumfs")
@click.option("-v", "--verbose", is_flag=True, help="Log what is being done to stderr.")
def main(verbose: bool) -> None:
    """Verified image layers, an encrypted writable filesystem, and their union, over FUSE."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="occlumfs: %(levelname)s: %(message)s",
    )


def _register() -> None:
    from occlumfs.cli import image, keys, mount, sefs, union

    for module in (mount, image, sefs, keys, union):
        for command in module.COMMANDS:
            main.add_command(command)


_register()

__all__ = ["ExitCode", "Group", "main"]
