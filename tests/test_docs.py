"""docs/ against the code: every command and option is documented, every documented one exists.

docs/cli.md is the reference a user reads; these checks catch an option added
without a word there, or one the docs still promise after it was removed.
"""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest

from libos.cli import copy_bom_command
from libos.cli import main as occlum_main
from libos.protocol import _CWD_FLAGS, _ENV_FLAGS
from occlumfs.cli import main as occlumfs_main
from occlumfs.errors import ExitCode

DOCS = Path(__file__).resolve().parent.parent / "docs"
CLI_MD = (DOCS / "cli.md").read_text()
LIBOS_MD = (DOCS / "libos.md").read_text()
# The occlum section of cli.md and docs/libos.md document the occlum command.
OCCLUM_DOCS = CLI_MD[CLI_MD.index("\n## occlum\n") :] + LIBOS_MD


def _walk(command: click.Command, path: tuple[str, ...] = ()):
    yield path, command
    if isinstance(command, click.Group):
        for name, sub in sorted(command.commands.items()):
            yield from _walk(sub, (*path, name))


def _options(command: click.Command) -> list[click.Option]:
    return [
        p
        for p in command.params
        if isinstance(p, click.Option) and "--help" not in p.opts and "--version" not in p.opts
    ]


def _named(opt: str, text: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(opt)}(?![\w-])", text) is not None


OCCLUMFS = list(_walk(occlumfs_main))
OCCLUM = [*_walk(occlum_main), (("copy_bom",), copy_bom_command)]


def _ids(prog: str, commands) -> list[str]:
    return [" ".join((prog, *p)) for p, _ in commands]


@pytest.mark.parametrize(("path", "command"), OCCLUMFS, ids=_ids("occlumfs", OCCLUMFS))
def test_every_occlumfs_command_and_option_is_in_cli_md(path, command):
    assert _named(" ".join(("occlumfs", *path)), CLI_MD), f"occlumfs {' '.join(path)}"
    missing = [p.opts for p in _options(command) if not any(_named(o, CLI_MD) for o in p.opts)]
    assert not missing, f"occlumfs {' '.join(path)}: options docs/cli.md does not name: {missing}"


@pytest.mark.parametrize(("path", "command"), OCCLUM, ids=_ids("occlum", OCCLUM))
def test_every_occlum_command_and_option_is_documented(path, command):
    name = path[0] if path == ("copy_bom",) else " ".join(("occlum", *path))
    assert _named(name, OCCLUM_DOCS), name
    missing = [p.opts for p in _options(command) if not any(_named(o, OCCLUM_DOCS) for o in p.opts)]
    assert not missing, f"{name}: options docs/cli.md and docs/libos.md do not name: {missing}"


def _synopses(prog: str) -> list[tuple[str, str]]:
    """(command line, the text of its synopsis) for each indented ``prog ...`` line
    of docs/cli.md, continuation lines included."""
    out: list[tuple[str, str]] = []
    for line in CLI_MD.splitlines():
        stripped = line.strip()
        if line.startswith("    ") and stripped.startswith(f"{prog} "):
            out.append((stripped, stripped))
        elif out and line.startswith("      ") and stripped.startswith("["):
            out[-1] = (out[-1][0], f"{out[-1][1]} {stripped}")
    return out


def _resolve(root: click.Group, words: list[str]) -> click.Command:
    command = root
    for word in words:
        if not isinstance(command, click.Group) or word not in command.commands:
            break
        command = command.commands[word]
    return command


@pytest.mark.parametrize(("prog", "root"), [("occlumfs", occlumfs_main), ("occlum", occlum_main)])
def test_every_option_in_a_synopsis_exists(prog, root):
    synopses = _synopses(prog)
    assert len(synopses) > 8
    for first, text in synopses:
        for part in re.split(rf" \| (?={prog} )", text):  # "occlum stop [-t S] | occlum kill"
            words = part.split()
            command = _resolve(root, [w for w in words[1:] if not w.startswith(("-", "["))])
            known = {o for p in command.params for o in (*p.opts, *p.secondary_opts)}
            if command.name == "exec":  # parsed by hand: Docker's options (docs/libos.md)
                known |= {*_CWD_FLAGS, *_ENV_FLAGS, "--"}
            named = set(re.findall(r"(?<![\w-])(--?[a-z][\w-]*)", part))
            assert named <= known, f"{first!r}: no such option {sorted(named - known)}"


def test_the_exit_code_table_is_the_code():
    table = CLI_MD[CLI_MD.index("## Exit codes") : CLI_MD.index("## Commands")]
    documented = {int(code) for code in re.findall(r"^\| (\d+) \|", table, re.M)}
    codes = {v for k, v in vars(ExitCode).items() if k.isupper()}
    assert documented == codes | {130}
