"""Malformed stores, generated: sefs.json, its key wrap and the head record.

Whatever the host writes there, `sefs info` and `fsck` (the real command line,
in-process) end with a documented exit code and at most one error line: never
a traceback, never a hang.
"""

from __future__ import annotations

import itertools
import json
import shutil
import struct
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from occlumfs.cli import main
from occlumfs.errors import ExitCode
from occlumfs.sefs import format as fmt
from occlumfs.sefs.keys import Credential, Keys, parse_config, unwrap_master
from sefs.helpers import make_volume, write_file

DOCUMENTED = {
    ExitCode.OK,
    ExitCode.WRONG_KEY,
    ExitCode.INTEGRITY,
    ExitCode.NOT_FOUND,
    ExitCode.FORMAT,
    ExitCode.FSCK,
}
FUZZ = settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


class Store:
    """The pristine store and a fresh copy of it per example."""

    def __init__(self, where: Path) -> None:
        self.volume = make_volume(where / "vol")
        fs = self.volume.open()
        write_file(fs, 1, b"f", b"contents" * 1000)
        fs.close()
        config = parse_config((self.volume.dir / "sefs.json").read_bytes(), "store")
        master = unwrap_master(config, Credential(key=self.volume.key), "store")
        self.keys = Keys(master, bytes.fromhex(config["fs_id"]))
        self.config = config
        self.head = (self.volume.dir / fmt.HEAD_NAME).read_bytes()
        self.scratch = where / "examples"
        self.scratch.mkdir()
        self._count = itertools.count()

    def copy(self) -> tuple[Path, Path]:
        n = next(self._count)
        store = self.scratch / f"s{n}"
        shutil.copytree(self.volume.dir, store, ignore=shutil.ignore_patterns("lock"))
        return store, self.scratch / f"state{n}"

    def exercise(self, store: Path, state: Path) -> None:
        start = time.perf_counter()
        for args in (
            ["sefs", "info", store],
            ["fsck", store, "--key-file", self.volume.key_file, "--state-dir", state],
        ):
            done = CliRunner().invoke(main, [str(a) for a in args])
            assert done.exception is None or isinstance(done.exception, SystemExit), done.exc_info
            assert done.exit_code in DOCUMENTED, (args, done.exit_code, done.stderr)
            if done.exit_code:
                assert done.stderr.count("\n") == 1, done.stderr
                assert "Traceback" not in done.stdout + done.stderr
        assert time.perf_counter() - start < 5


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Store:
    return Store(tmp_path_factory.mktemp("fuzz"))


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=40)
    | st.sampled_from([4096, 1, 0, "", "00", "AES-256-GCM", "key-file", "passphrase", 1, 2])
    | st.integers(0, 64).map(lambda n: "ab" * n),  # hex of every length
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=8,
)  # fmt: skip
FIELDS = [
    ("format",), ("version",), ("fs_id",), ("block_size",), ("cipher",), ("wrap",),
    ("wrap", "kind"), ("wrap", "salt"), ("wrap", "nonce"), ("wrap", "wrapped_key"),
    ("wrap", "scrypt"), ("wrap", "scrypt", "n"), ("wrap", "scrypt", "r"), ("wrap", "scrypt", "p"),
    ("extra",), ("wrap", "extra"),
]  # fmt: skip
edits = st.lists(
    st.tuples(st.sampled_from(FIELDS), st.one_of(st.just("delete"), json_values)),
    min_size=1,
    max_size=4,
)


def _apply(config: dict, path: tuple[str, ...], value) -> None:
    node = config
    for key in path[:-1]:
        if not isinstance(node, dict):
            return
        node = node.setdefault(key, {})
    if not isinstance(node, dict):
        return
    if value == "delete":
        node.pop(path[-1], None)
    else:
        node[path[-1]] = value


@FUZZ
@given(changes=edits)
def test_edited_config_and_key_wrap_give_one_line(store, changes):
    copy, state = store.copy()
    config = json.loads(json.dumps(store.config))
    for path, value in changes:
        _apply(config, path, value)
    (copy / "sefs.json").write_text(json.dumps(config))
    store.exercise(copy, state)


@FUZZ
@given(raw=st.binary(max_size=600), cut=st.integers(0, 400))
def test_garbled_config_bytes_give_one_line(store, raw, cut):
    copy, state = store.copy()
    original = (copy / "sefs.json").read_bytes()
    (copy / "sefs.json").write_bytes(original[:cut] + raw)
    store.exercise(copy, state)


@FUZZ
@given(
    fields=st.lists(
        st.tuples(st.integers(0, fmt.HEAD_SIZE - 40), st.integers(0, 2**64 - 1)),
        min_size=1,
        max_size=4,
    ),
    remac=st.booleans(),
    length=st.one_of(st.just(fmt.HEAD_SIZE), st.integers(0, 2 * fmt.HEAD_SIZE)),
)
def test_crafted_head_records_give_one_line(store, fields, remac, length):
    """Fields overwritten, re-MAC'd with the real key or not, and cut or padded."""
    raw = bytearray(store.head)
    for pos, value in fields:
        struct.pack_into(">Q", raw, pos, value)
    if remac:
        body = bytes(raw[: fmt.HEAD_SIZE - 32])
        raw = bytearray(fmt.pack_head(_parse_body(body), store.keys.head_mac)) if body else raw
    raw = (bytes(raw) + bytes(length))[:length]
    copy, state = store.copy()
    (copy / fmt.HEAD_NAME).write_bytes(raw)
    store.exercise(copy, state)


def _parse_body(body: bytes) -> fmt.Head:
    _magic, fs_id, counter, pack, offset, length, tag = struct.unpack(">8s16sQQQI16s", body)
    return fmt.Head(fs_id, counter, fmt.ObjectRef(pack, offset, length, tag))
