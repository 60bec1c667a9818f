"""The ``occlumfs`` command line as a whole: help everywhere, one-line errors, exit codes."""

from __future__ import annotations

import os

import click
import pytest
from click.testing import CliRunner
from conftest import run_cli

from occlumfs import __version__
from occlumfs.cli import Group, main
from occlumfs.errors import ExitCode


def _walk(command: click.Command, path: tuple[str, ...] = ()):
    yield path, command
    if isinstance(command, click.Group):
        for name, sub in sorted(command.commands.items()):
            yield from _walk(sub, (*path, name))


COMMANDS = list(_walk(main))


def test_the_walk_finds_every_command():
    names = {" ".join(path) for path, _ in COMMANDS}
    assert {"", "mount", "umount", "keygen"} <= names
    assert len(names) > 4


@pytest.mark.parametrize(
    ("path", "command"), COMMANDS, ids=[" ".join(("occlumfs", *p)) for p, _ in COMMANDS]
)
def test_every_command_and_option_has_help(path, command):
    assert (command.help or "").strip(), f"'occlumfs {' '.join(path)}' has no help text"
    undocumented = [
        p.name for p in command.params if isinstance(p, click.Option) and not (p.help or "").strip()
    ]
    assert not undocumented, f"'occlumfs {' '.join(path)}' options without help: {undocumented}"
    result = CliRunner().invoke(main, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("Usage: ")
    assert command.help.split()[0] in result.output


def test_version():
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0 and __version__ in result.output


def test_unknown_command_is_a_usage_error():
    done = run_cli("no-such-command", check=False)
    assert done.returncode == ExitCode.USAGE
    assert "No such command" in done.stderr and "Traceback" not in done.stderr


def test_library_errors_are_one_line_with_the_documented_code(tmp_path):
    done = run_cli("mount", tmp_path / "absent", tmp_path, check=False)
    assert done.returncode == ExitCode.NOT_FOUND
    assert done.stderr.strip() == f"occlumfs: error: {tmp_path / 'absent'} does not exist"


def test_unforeseen_host_errors_are_one_line_too():
    @click.group(cls=Group)
    def tool() -> None:
        """A group like occlumfs."""

    @tool.command()
    def missing() -> None:
        """Fails on a path."""
        raise FileNotFoundError(2, "No such file or directory", "/some/path")

    @tool.command()
    def denied() -> None:
        """Fails on a permission."""
        raise PermissionError(13, "Permission denied", "/root/x")

    result = CliRunner().invoke(tool, ["missing"])
    assert result.exit_code == ExitCode.NOT_FOUND
    assert result.output == "occlumfs: error: /some/path: No such file or directory\n"
    result = CliRunner().invoke(tool, ["denied"])
    assert result.exit_code == ExitCode.ERROR
    assert result.output == "occlumfs: error: /root/x: Permission denied\n"


def test_unforeseen_bugs_are_one_line_too():
    @click.group(cls=Group)
    def tool() -> None:
        """A group like occlumfs."""

    @tool.command()
    def broken() -> None:
        """Fails on a bug."""
        raise ValueError("nonce must be 12 bytes")

    result = CliRunner().invoke(tool, ["broken"])
    assert result.exit_code == ExitCode.ERROR
    assert result.output == (
        "occlumfs: error: internal error: ValueError: nonce must be 12 bytes (-v shows where)\n"
    )


def test_the_exit_codes_docs_cli_md_gives_for_images(tmp_path):
    src = tmp_path / "src"
    (src / "dir").mkdir(parents=True)
    (src / "dir" / "file").write_bytes(b"x")
    plain, encrypted, key = tmp_path / "plain.img", tmp_path / "enc.img", tmp_path / "k"
    run_cli("mkimage", src, plain)
    run_cli("keygen", key)
    run_cli("mkimage", "--key-file", key, src, encrypted)
    damaged = tmp_path / "damaged.img"
    raw = bytearray(plain.read_bytes())
    raw[8] ^= 0xFF  # the version field: the header no longer parses
    damaged.write_bytes(raw)
    cases = [
        (("cat", plain, "/dir"), ExitCode.USAGE, "/dir: not a regular file in"),
        (("cat", encrypted, "/dir/file"), ExitCode.WRONG_KEY, "is encrypted: give its key"),
        (("verify", damaged), ExitCode.FORMAT, "format version"),
        (("digest", damaged), ExitCode.FORMAT, "format version"),
        (("mkimage", src, tmp_path / "no" / "x.img"), ExitCode.NOT_FOUND, "no such directory"),
    ]
    for args, code, message in cases:
        done = run_cli(*args, check=False)
        assert done.returncode == code, (args, done.stderr)
        assert len(done.stderr.splitlines()) == 1 and message in done.stderr, done.stderr
    assert not (tmp_path / "no").exists()


def test_mount_refuses_what_it_would_not_check(tmp_path):
    image, key, store = tmp_path / "x.img", tmp_path / "k", tmp_path / "store"
    (tmp_path / "src").mkdir()
    digest = run_cli("mkimage", tmp_path / "src", image).stdout.split()[-1]
    run_cli("keygen", key)
    run_cli("sefs", "create", store, "--key-file", key, "--state-dir", tmp_path / "state")
    (tmp_path / "mnt").mkdir()
    pinned = run_cli("mount", store, tmp_path / "mnt", "--key-file", key, "--digest", digest,
                     "--state-dir", tmp_path / "state", check=False)  # fmt: skip
    assert pinned.returncode == ExitCode.USAGE
    assert pinned.stderr == f"occlumfs: error: --digest pins an image; {store} is mounted as sefs\n"
    as_sefs = run_cli(
        "mount", "-t", "sefs", image, tmp_path / "mnt", "--key-file", key, check=False
    )
    assert as_sefs.stderr == f"occlumfs: error: {image}: is a regular file, not a directory\n"
    assert as_sefs.returncode == ExitCode.USAGE  # a file named where a store belongs
    assert not os.path.ismount(tmp_path / "mnt")
