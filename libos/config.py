"""``Occlum.json``: the default template, a parser that knows line numbers, and the schema.

Occlum's keys are accepted as Occlum accepts them (sizes such as ``"32MB"``,
or ``{"init": ..., "max": ...}`` as its EDMM configs spell them). A key that
is not Occlum's, a value of the wrong type, or a JSON syntax error is one
line naming the key path and the line of the file: a typo in a limit must
not be silently ignored and run with the default.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from occlumfs.errors import FormatError, NotFoundError

DEFAULT_CONFIG: dict = {
    "resource_limits": {
        "user_space_size": "256MB",
        "kernel_space_heap_size": "32MB",
        "kernel_space_stack_size": "1MB",
        "max_num_of_threads": 32,
    },
    "process": {
        "default_stack_size": "4MB",
        "default_heap_size": "16MB",
        "default_mmap_size": "32MB",
    },
    "entry_points": ["/bin"],
    "env": {"default": ["OCCLUM=yes"], "untrusted": ["EXAMPLE"]},
    "metadata": {
        "product_id": 0,
        "version_number": 0,
        "debuggable": True,
        "enable_kss": False,
        "pkru": 0,
    },
    "mount": [
        {
            "target": "/",
            "type": "unionfs",
            "options": {
                "layers": [
                    {
                        "target": "/",
                        "type": "sefs",
                        "source": "./build/mount/__ROOT",
                        "options": {"MAC": ""},
                    },
                    {"target": "/", "type": "sefs", "source": "./run/mount/__ROOT"},
                ]
            },
        },
        {"target": "/host", "type": "hostfs", "source": "."},
        {"target": "/proc", "type": "procfs"},
        {"target": "/dev", "type": "devfs"},
    ],
}

# ---------------------------------------------------------------- parsing


class _Parser:
    """JSON with the line of every value, keyed by its path (``env.default[1]``)."""

    _NUMBER = re.compile(r"-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][-+]?\d+)?")
    _SPACE = re.compile(r"[ \t\n\r]*")

    def __init__(self, text: str, where: str) -> None:
        self.text = text
        self.where = where
        self.lines: dict[str, int] = {}

    def line_at(self, pos: int) -> int:
        return self.text.count("\n", 0, pos) + 1

    def fail(self, pos: int, what: str) -> FormatError:
        return FormatError(f"{self.where}:{self.line_at(pos)}: {what}")

    def skip(self, pos: int) -> int:
        return self._SPACE.match(self.text, pos).end()

    def parse(self) -> object:
        pos = self.skip(0)
        value, pos = self.value(pos, "")
        pos = self.skip(pos)
        if pos != len(self.text):
            raise self.fail(pos, "unexpected text after the JSON value")
        return value

    def value(self, pos: int, path: str) -> tuple[object, int]:
        self.lines[path] = self.line_at(pos)
        text = self.text
        if pos >= len(text):
            raise self.fail(pos, f"{path or 'the file'}: unexpected end of file")
        c = text[pos]
        if c == "{":
            return self.obj(pos + 1, path)
        if c == "[":
            return self.array(pos + 1, path)
        if c == '"':
            return self.string(pos)
        for word, val in (("true", True), ("false", False), ("null", None)):
            if text.startswith(word, pos):
                return val, pos + len(word)
        m = self._NUMBER.match(text, pos)
        if m:
            num = m.group()
            return (float(num) if any(ch in num for ch in ".eE") else int(num)), m.end()
        raise self.fail(pos, f"{path or 'value'}: not a JSON value")

    def string(self, pos: int) -> tuple[str, int]:
        try:
            return json.decoder.scanstring(self.text, pos + 1)
        except json.JSONDecodeError as exc:
            raise self.fail(exc.pos, f"bad string: {exc.msg}") from None

    def obj(self, pos: int, path: str) -> tuple[dict, int]:
        out: dict = {}
        pos = self.skip(pos)
        if self.text.startswith("}", pos):
            return out, pos + 1
        while True:
            if not self.text.startswith('"', pos):
                raise self.fail(pos, f"{path or 'top level'}: expected a quoted key")
            key_line = self.line_at(pos)
            key, pos = self.string(pos)
            sub = f"{path}.{key}" if path else key
            if key in out:
                raise self.fail(pos, f"{sub}: duplicate key")
            pos = self.skip(pos)
            if not self.text.startswith(":", pos):
                raise self.fail(pos, f"{sub}: expected ':'")
            pos = self.skip(pos + 1)
            out[key], pos = self.value(pos, sub)
            self.lines[sub] = key_line
            pos = self.skip(pos)
            if self.text.startswith(",", pos):
                pos = self.skip(pos + 1)
                continue
            if self.text.startswith("}", pos):
                return out, pos + 1
            raise self.fail(pos, f"{sub}: expected ',' or '}}'")

    def array(self, pos: int, path: str) -> tuple[list, int]:
        out: list = []
        pos = self.skip(pos)
        if self.text.startswith("]", pos):
            return out, pos + 1
        while True:
            item, pos = self.value(pos, f"{path}[{len(out)}]")
            out.append(item)
            pos = self.skip(pos)
            if self.text.startswith(",", pos):
                pos = self.skip(pos + 1)
                continue
            if self.text.startswith("]", pos):
                return out, pos + 1
            raise self.fail(pos, f"{path}: expected ',' or ']'")


# ---------------------------------------------------------------- schema

_SIZE = re.compile(r"^\s*(\d+)\s*([KMGT]?)B?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


# The sandbox's limits are rlimits or cgroup files: a size past 2**63 - 1 bytes
# cannot be set (it failed as "bubblewrap did not start"), nor a task count
# past the kernel's PID_MAX_LIMIT (pids.max refuses it).
MAX_SIZE = (1 << 63) - 1
MAX_TASKS = 1 << 22


def parse_size(text: str) -> int | None:
    """``"32MB"`` → bytes (Occlum's units are binary); None when not a size."""
    m = _SIZE.match(text)
    return int(m.group(1)) * _UNITS[m.group(2).upper()] if m else None


SIZE = "size"
INT = "int"
TASKS = "tasks"  # a number of tasks: the kernel never has more than PID_MAX_LIMIT
BOOL = "bool"
STR = "str"
STRS = "strs"
HEX_PAIR = {"high": STR, "low": STR}
SIZE_OR_RANGE = "size_or_range"
MOUNTS = "mounts"
ANY_LIST = "any_list"

SCHEMA: dict = {
    "resource_limits": {
        "user_space_size": SIZE_OR_RANGE,
        "user_space_max_size": SIZE,
        "kernel_space_heap_size": SIZE_OR_RANGE,
        "kernel_space_heap_max_size": SIZE,
        "kernel_space_stack_size": SIZE,
        "max_num_of_threads": TASKS,
        "init_num_of_threads": TASKS,
        "num_of_cpus": INT,
    },
    "process": {
        "default_stack_size": SIZE,
        "default_heap_size": SIZE,
        "default_mmap_size": SIZE,
    },
    "entry_points": STRS,
    "env": {"default": STRS, "untrusted": STRS},
    "metadata": {
        "product_id": INT,
        "version_number": INT,
        "debuggable": BOOL,
        "enable_kss": BOOL,
        "family_id": HEX_PAIR,
        "ext_prod_id": HEX_PAIR,
        "pkru": INT,
        "amx": INT,
    },
    "feature": {"amx": INT, "pkru": INT, "enable_edmm": BOOL, "enable_posix_shm": BOOL},
    "mount": MOUNTS,
    "untrusted_unix_socks": ANY_LIST,
}

MOUNT_KEYS = {"target": STR, "type": STR, "source": STR, "options": "mount_options"}
MOUNT_TYPES = {"unionfs", "sefs", "hostfs", "procfs", "devfs", "ramfs", "image"}
MOUNT_OPTIONS = {
    "layers": MOUNTS,
    "MAC": STR,
    "temporary": BOOL,
    "cache_size": SIZE,
    "index": INT,
    "autokey_policy": INT,
}


@dataclass
class Config:
    """A validated ``Occlum.json``: the parsed data and where it came from."""

    data: dict
    path: Path | None = None
    lines: dict[str, int] = field(default_factory=dict)

    def get(self, *keys: str, default=None):
        node = self.data
        for key in keys:
            if not isinstance(node, dict) or key not in node:
                return default
            node = node[key]
        return node

    @property
    def entry_points(self) -> list[str]:
        return list(self.get("entry_points", default=["/bin"]))

    @property
    def env_default(self) -> list[str]:
        return list(self.get("env", "default", default=[]))

    @property
    def env_untrusted(self) -> list[str]:
        return list(self.get("env", "untrusted", default=[]))

    @property
    def product_id(self) -> int:
        return int(self.get("metadata", "product_id", default=0))

    def size(self, section: str, key: str) -> int | None:
        value = self.get(section, key)
        if isinstance(value, dict):
            value = value.get("init")
        return parse_size(value) if isinstance(value, str) else None

    def mounts(self) -> list[dict]:
        return list(self.get("mount", default=DEFAULT_CONFIG["mount"]))


class _Checker:
    def __init__(self, where: str, lines: dict[str, int]) -> None:
        self.where = where
        self.lines = lines

    def fail(self, path: str, what: str) -> FormatError:
        line = self.lines.get(path)
        at = f"{self.where}:{line}" if line else self.where
        return FormatError(f"{at}: {path}: {what}")

    def check(self, value, spec, path: str) -> None:
        if isinstance(spec, dict):
            if not isinstance(value, dict):
                raise self.fail(path, "expected an object")
            for key, sub in value.items():
                subpath = f"{path}.{key}" if path else key
                if key not in spec:
                    raise self.fail(subpath, "unknown key")
                self.check(sub, spec[key], subpath)
            return
        getattr(self, f"_{spec}")(value, path)

    def _int(self, value, path: str) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise self.fail(path, "expected a non-negative whole number")

    def _tasks(self, value, path: str) -> None:
        self._int(value, path)
        if value > MAX_TASKS:
            raise self.fail(path, f"{value} tasks: at most {MAX_TASKS} (the kernel's own limit)")

    def _bool(self, value, path: str) -> None:
        if not isinstance(value, bool):
            raise self.fail(path, "expected true or false")

    def _str(self, value, path: str) -> None:
        if not isinstance(value, str):
            raise self.fail(path, "expected a string")

    def _strs(self, value, path: str) -> None:
        if not isinstance(value, list):
            raise self.fail(path, "expected a list of strings")
        for i, item in enumerate(value):
            self._str(item, f"{path}[{i}]")

    def _any_list(self, value, path: str) -> None:
        if not isinstance(value, list):
            raise self.fail(path, "expected a list")

    def _size(self, value, path: str) -> None:
        size = parse_size(value) if isinstance(value, str) else None
        if size is None:
            raise self.fail(path, 'expected a size such as "32MB"')
        if size > MAX_SIZE:
            raise self.fail(path, f"{value}: too large (at most {MAX_SIZE >> 40}TB)")

    def _size_or_range(self, value, path: str) -> None:
        if isinstance(value, dict):
            self.check(value, {"init": SIZE, "max": SIZE}, path)
        else:
            self._size(value, path)

    def _mounts(self, value, path: str) -> None:
        if not isinstance(value, list):
            raise self.fail(path, "expected a list of mounts")
        for i, item in enumerate(value):
            sub = f"{path}[{i}]"
            self.check(item, MOUNT_KEYS, sub)
            for key in ("target", "type"):
                if key not in item:
                    raise self.fail(sub, f"missing '{key}'")
            if item["type"] not in MOUNT_TYPES:
                raise self.fail(f"{sub}.type", f"unknown mount type {item['type']!r}")
            if not item["target"].startswith("/"):
                raise self.fail(f"{sub}.target", "not an absolute path")

    def _mount_options(self, value, path: str) -> None:
        self.check(value, MOUNT_OPTIONS, path)


def check_config(data: object, where: str, lines: dict[str, int] | None = None) -> Config:
    lines = lines or {}
    checker = _Checker(where, lines)
    checker.check(data, SCHEMA, "")
    config = Config(data, None, lines)
    # What execve cannot pass (a run failed with "the sandbox could not be set up").
    for i, env in enumerate(config.env_default):
        if "=" not in env or env.startswith("=") or "\0" in env:
            raise checker.fail(f"env.default[{i}]", "expected NAME=value (no NUL)")
    for i, name in enumerate(config.env_untrusted):
        if not name or "=" in name or "\0" in name:
            raise checker.fail(f"env.untrusted[{i}]", "expected a variable's NAME")
    for i, ep in enumerate(config.entry_points):
        if not ep.startswith("/"):
            raise checker.fail(f"entry_points[{i}]", "not an absolute path")
    return config


def parse_config(text: str, where: str) -> Config:
    parser = _Parser(text, where)
    data = parser.parse()
    return check_config(data, where, parser.lines)


def load_config(path: Path) -> Config:
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise NotFoundError(f"{path}: not found (is this an Occlum instance?)") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise FormatError(f"{path}:{line}: not UTF-8 text") from None
    config = parse_config(text, str(path))
    config.path = Path(path)
    return config


def dump_config(data: dict) -> str:
    return json.dumps(data, indent=4) + "\n"
