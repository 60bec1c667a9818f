"""What the CLI needs before click is loaded: its one-line error reports, and
``occlumfs mkimage SRC IMAGE [-j N]`` run without click at all.

Why: ``occlumfs mkimage`` of a small tree is mostly start-up, and click (with
what it imports) is about a quarter of that (docs/performance.md, issue 11).
:func:`run_plain` runs only that plain form, with stderr not a terminal (no
progress bar) and no key; any other command line, ``--help`` or a malformed one
included, goes to click, which parses it as it always did. Both ways share the
body's checks (:func:`source_date_epoch`, :func:`check_source`) and the error
lines (:func:`host_error`, :func:`reportable`), so a plain mkimage prints and
exits exactly as through click.
"""

from __future__ import annotations

import os
import sys

from occlumfs.errors import ExitCode, NotFoundError, OcclumfsError, UsageError

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without loading typing
if TYPE_CHECKING:
    from pathlib import Path

PROG = "occlumfs"


def source_date_epoch() -> int | None:
    text = os.environ.get("SOURCE_DATE_EPOCH")
    if text is None or text == "":
        return None
    try:
        epoch = int(text)
    except ValueError:
        raise UsageError(f"SOURCE_DATE_EPOCH={text!r} is not a whole number of seconds") from None
    if epoch * 1_000_000_000 < -(1 << 63):  # later ones clamp nothing an mtime can hold
        raise UsageError(f"SOURCE_DATE_EPOCH={text!r} is out of range")
    return epoch


def check_source(src: str | os.PathLike) -> None:
    from occlumfs.merkle.build import missing

    if missing(src):
        raise NotFoundError(f"{src} does not exist")


def host_error(exc: OSError) -> OcclumfsError:
    """A command's host error as its one line (exit 1): ``path: reason``."""
    where = f"{os.fsdecode(exc.filename)}: " if exc.filename else ""
    return OcclumfsError(f"{where}{exc.strerror or exc}")


def reportable(exc: Exception) -> OcclumfsError:
    """What the top-level command reports for an error no command turned into one line."""
    import logging  # only on this path: a plain mkimage does not load it

    if isinstance(exc, OcclumfsError):
        return exc
    if isinstance(exc, OSError):
        # The host refused something (a path, a permission) that the
        # library did not foresee: still one line, never a traceback.
        logging.getLogger("occlumfs").info("host error", exc_info=True)  # shown with -v
        where = f"{exc.filename}: " if exc.filename else ""
        kind = NotFoundError if isinstance(exc, FileNotFoundError) else OcclumfsError
        return kind(f"{where}{exc.strerror or exc}")
    # A bug, not a user mistake: still one line; the traceback with -v.
    logging.getLogger("occlumfs").info("internal error", exc_info=True)
    return OcclumfsError(f"internal error: {type(exc).__name__}: {exc} (-v shows where)")


def check_stdout() -> None:
    """Refuse to start when stdout is closed (``>&-``): Python has no sys.stdout
    then, and what the command prints (a digest, a listing, a file) would be lost."""
    if sys.stdout is None:
        raise OcclumfsError("stdout is closed: nowhere to write the output")


def quiet_broken_pipe() -> int:
    """The reader of stdout went away (``... | head``): stop quietly."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return ExitCode.ERROR


def plain_mkimage(argv: list[str]) -> tuple[Path, Path, int | None] | None:
    """(SRC, IMAGE, jobs) of ``mkimage SRC IMAGE [-j N|-jN|--jobs N|--jobs=N]``, else None."""
    parsed = _plain_args(argv)
    if parsed is None:
        return None
    from pathlib import Path

    return Path(parsed[0]), Path(parsed[1]), parsed[2]


def _plain_args(argv: list[str]) -> tuple[str, str, int | None] | None:
    """:func:`plain_mkimage` with the paths as given (no pathlib: ~10 ms of start-up)."""
    if not argv or argv[0] != "mkimage" or sys.stderr.isatty():
        return None
    paths: list[str] = []
    jobs: str | None = None
    rest = iter(argv[1:])
    for arg in rest:
        if arg in ("-j", "--jobs"):
            value = next(rest, None)
        elif arg.startswith("--jobs="):
            value = arg[len("--jobs=") :]
        elif arg.startswith("-j"):
            value = arg[2:]
        elif arg and not arg.startswith("-"):
            paths.append(arg)
            continue
        else:
            return None  # an option (or an empty name) click must judge
        if jobs is not None or value is None or not value.isdecimal() or not int(value) >= 1:
            return None
        jobs = value
    if len(paths) != 2 or not all(_click_accepts(p, i == 1) for i, p in enumerate(paths)):
        return None
    return paths[0], paths[1], None if jobs is None else int(jobs)


def _click_accepts(path: str, is_image: bool) -> bool:
    """What click's checks of an existing path (``click.Path``) would let through:
    a readable path, not a directory for IMAGE."""
    if not os.path.exists(path):
        return True
    return not (is_image and os.path.isdir(path)) and os.access(path, os.R_OK)


def run_plain(argv: list[str]) -> int | None:
    """Run a plain mkimage (see :func:`plain_mkimage`): its exit code, or None for click."""
    parsed = _plain_args(argv)
    if parsed is None:
        return None
    try:
        try:
            from occlumfs.merkle.build import build_image, path_text

            # As click's Path would show them in messages (IMAGE as given: a
            # trailing "/" is refused, not dropped; build_image shows it so).
            src, image, jobs = path_text(parsed[0]), parsed[1], parsed[2]

            check_stdout()
            epoch = source_date_epoch()
            check_source(src)
            digest = build_image(src, image, source_date_epoch=epoch, jobs=jobs)
            sys.stdout.write(digest + "\n")
            sys.stdout.flush()
        except OcclumfsError:
            raise
        except BrokenPipeError:
            return quiet_broken_pipe()
        except OSError as exc:
            raise host_error(exc) from None
    except KeyboardInterrupt:
        sys.stderr.write(f"{PROG}: interrupted\n")
        return 130
    except Exception as exc:
        error = reportable(exc)
        sys.stderr.write(f"{PROG}: error: {error}\n")
        return error.exit_code
    return ExitCode.OK
