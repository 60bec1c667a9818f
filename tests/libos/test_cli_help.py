"""Every occlum command and option says what it does; errors are one line."""

from __future__ import annotations

import click
import pytest
from click.testing import CliRunner
from libos_fixtures import *  # noqa: F403 (the fixtures of tests/libos)

from libos.cli import copy_bom_command, main

COMMANDS = sorted(main.commands.items())


def test_the_occlum_verbs_are_there():
    assert {"new", "init", "build", "run", "print", "status", "copy-bom"} <= set(main.commands)


@pytest.mark.parametrize(("name", "command"), [*COMMANDS, ("copy_bom", copy_bom_command)])
def test_every_command_and_option_has_help(name, command):
    assert command.help and command.help.strip(), name
    for param in command.params:
        if isinstance(param, click.Option):
            assert param.help, f"{name} {param.opts}"
    result = CliRunner().invoke(
        main if command is not copy_bom_command else command,
        [name, "--help"] if command is not copy_bom_command else ["--help"],
    )
    assert result.exit_code == 0 and "Usage:" in result.output


def test_outside_an_instance_is_one_line(tmp_path, occlum):
    done = occlum("build", cwd=tmp_path, check=False)
    assert done.returncode == 14
    assert done.stderr.strip().splitlines() == [
        f"occlum: error: {tmp_path}: not an Occlum instance (no Occlum.json); run 'occlum init'"
    ]


def test_new_where_the_directory_cannot_be_made_is_one_line(tmp_path, occlum):
    # procfs takes no new directory (ENOENT): as a missing parent, 14.
    refused = occlum("new", "/proc/occlum-new-test", check=False)
    assert refused.returncode == 14, refused.stderr
    assert refused.stderr.count("\n") == 1 and "/proc/occlum-new-test" in refused.stderr
    # A parent that is a file: 1, the path named, nothing made.
    (tmp_path / "file").write_text("")
    refused = occlum("new", tmp_path / "file/inst", check=False)
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1, refused.stderr
    assert f"{tmp_path}/file" in refused.stderr and "Traceback" not in refused.stderr
