"""Key files: the `occlum gen-image-key` format, mode 0600, never overwritten, clear errors."""

from __future__ import annotations

import os
import re
import stat

import pytest
from conftest import run_cli

from occlumfs.errors import ExitCode, FormatError, NotFoundError
from occlumfs.keys import format_key, load_key_file, parse_key

KEY_LINE = re.compile(r"[0-9a-f]{2}(-[0-9a-f]{2}){15}\n")


def test_keygen_writes_the_gen_image_key_format_with_mode_0600(tmp_path):
    path = tmp_path / "image.key"
    done = run_cli("keygen", path)
    assert KEY_LINE.fullmatch(path.read_text())
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert str(path) in done.stderr and path.read_text().strip() not in done.stderr + done.stdout
    assert len(load_key_file(path)) == 16
    other = tmp_path / "other.key"
    run_cli("keygen", other)
    assert load_key_file(other) != load_key_file(path)  # random, not a constant
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp left


def test_keygen_refuses_to_overwrite(tmp_path):
    path = tmp_path / "image.key"
    run_cli("keygen", path)
    before = path.read_bytes()
    done = run_cli("keygen", path, check=False)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "already exists" in lines[0]
    assert path.read_bytes() == before
    run_cli("keygen", path, "--force")
    assert path.read_bytes() != before and KEY_LINE.fullmatch(path.read_text())


def test_reads_keys_written_by_occlum(tmp_path):
    # `occlum gen-image-key` output: lowercase hex pairs and a newline; we
    # accept upper case and no newline too.
    key = bytes.fromhex("c732b3ed44dfec7b252d9a32388d5861")
    for text in (
        "c7-32-b3-ed-44-df-ec-7b-25-2d-9a-32-38-8d-58-61\n",
        "C7-32-B3-ED-44-DF-EC-7B-25-2D-9A-32-38-8D-58-61",
    ):
        (tmp_path / "k").write_text(text)
        assert load_key_file(tmp_path / "k") == key
    assert format_key(key) == "c7-32-b3-ed-44-df-ec-7b-25-2d-9a-32-38-8d-58-61"
    assert parse_key(format_key(key)) == key


MALFORMED = {
    "empty": b"",
    "too short": b"c7-32-b3-ed-44-df-ec-7b-25-2d-9a-32-38-8d-58\n",
    "too long": b"c7-32-b3-ed-44-df-ec-7b-25-2d-9a-32-38-8d-58-61-62\n",
    "not hex": b"zz-32-b3-ed-44-df-ec-7b-25-2d-9a-32-38-8d-58-61\n",
    "other separator": b"c7:32:b3:ed:44:df:ec:7b:25:2d:9a:32:38:8d:58:61\n",
    "no separator": b"c732b3ed44dfec7b252d9a32388d5861\n",
    "binary": bytes(range(256)),
    "two keys": b"c7-32-b3-ed-44-df-ec-7b-25-2d-9a-32-38-8d-58-61\n" * 2,
    "a passphrase": b"correct horse battery staple\n",
}


@pytest.mark.parametrize("content", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_key_files_are_one_line_exit_15(tmp_path, content):
    path = tmp_path / "bad.key"
    path.write_bytes(content)
    with pytest.raises(FormatError):
        load_key_file(path)
    done = run_cli("mount", "--type", "mem", "x", tmp_path, "--key-file", path, check=False)
    assert done.returncode == ExitCode.FORMAT
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0] and "Traceback" not in done.stderr
    assert b"horse" not in done.stderr.encode()  # key material is never echoed


def test_a_directory_or_missing_key_file(tmp_path):
    done = run_cli("mount", "--type", "mem", "x", tmp_path, "--key-file", tmp_path, check=False)
    assert done.returncode == ExitCode.USAGE  # click refuses a directory for a file option
    with pytest.raises(FormatError):
        load_key_file(tmp_path)
    missing = tmp_path / "missing.key"
    with pytest.raises(NotFoundError):
        load_key_file(missing)
    done = run_cli("mount", "--type", "mem", "x", tmp_path, "--key-file", missing, check=False)
    assert done.returncode == ExitCode.NOT_FOUND
    assert len(done.stderr.strip().splitlines()) == 1 and "not found" in done.stderr


def test_keygen_into_a_missing_directory_is_one_line(tmp_path):
    done = run_cli("keygen", tmp_path / "absent" / "k", check=False)
    assert done.returncode == ExitCode.NOT_FOUND
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "does not exist" in lines[0] and "Traceback" not in done.stderr
