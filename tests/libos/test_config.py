"""Occlum.json: Occlum's keys accepted, anything else named with its line; entry points; env."""

from __future__ import annotations

import json

import pytest
from libos_fixtures import *  # noqa: F403 (the fixtures of tests/libos)

from libos.config import DEFAULT_CONFIG, parse_config, parse_size
from libos.run import check_entry_point, program_env
from occlumfs.errors import FormatError, UsageError


def test_the_default_template_is_accepted():
    config = parse_config(json.dumps(DEFAULT_CONFIG, indent=4), "Occlum.json")
    assert config.entry_points == ["/bin"]
    assert config.size("resource_limits", "user_space_size") == 256 << 20


def test_occlum_edmm_style_sizes_and_optional_keys_are_accepted():
    data = json.loads(json.dumps(DEFAULT_CONFIG))
    data["resource_limits"]["kernel_space_heap_size"] = {"init": "32MB", "max": "512MB"}
    data["resource_limits"]["user_space_max_size"] = "1GB"
    data["metadata"]["ext_prod_id"] = {"high": "0x0", "low": "0x0"}
    data["feature"] = {"enable_edmm": False, "amx": 0}
    config = parse_config(json.dumps(data), "x")
    assert config.size("resource_limits", "kernel_space_heap_size") == 32 << 20


@pytest.mark.parametrize(
    ("edit", "path"),
    [
        (lambda d: d["resource_limits"].update(max_threads=3), "resource_limits.max_threads"),
        (lambda d: d.update(entrypoints=["/bin"]), "entrypoints"),
        (lambda d: d["resource_limits"].update(user_space_size="lots"), "user_space_size"),
        (lambda d: d["metadata"].update(debuggable="yes"), "metadata.debuggable"),
        (lambda d: d["env"].update(default=["NOEQUALS"]), "env.default[0]"),
        (lambda d: d["env"].update(default=["A=1", "=x"]), "env.default[1]"),
        (lambda d: d["env"].update(default=["A=1", "B=2", "A\0B=1"]), "env.default[2]"),
        (lambda d: d["env"].update(untrusted=["EXAMPLE", "A=B"]), "env.untrusted[1]"),
        (lambda d: d["env"].update(untrusted=[""]), "env.untrusted[0]"),
        (lambda d: d["mount"][1].update(type="nfs"), "mount[1].type"),
        (lambda d: d["mount"][0]["options"]["layers"][0].update(bogus=1), "layers[0].bogus"),
        (lambda d: d.update(entry_points=["bin"]), "entry_points[0]"),
        # Limits the sandbox could not set (run failed: "bubblewrap did not start").
        (
            lambda d: d["resource_limits"].update(max_num_of_threads=10**30),
            "resource_limits.max_num_of_threads",
        ),
        (
            lambda d: d["resource_limits"].update(user_space_size="9000000TB"),
            "resource_limits.user_space_size",
        ),
        (lambda d: d["process"].update(default_stack_size="1" + "0" * 30), "default_stack_size"),
    ],
)
def test_bad_keys_and_values_name_the_key_path_and_line(edit, path):
    data = json.loads(json.dumps(DEFAULT_CONFIG))
    edit(data)
    text = json.dumps(data, indent=4)
    with pytest.raises(FormatError) as err:
        parse_config(text, "Occlum.json")
    message = str(err.value)
    assert path in message and "\n" not in message
    line = int(message.split(":")[1])
    shown = text.splitlines()[line - 1]
    leaf = path.rsplit(".", 1)[-1]
    expected = {
        "default[0]": "NOEQUALS",
        "default[1]": '"=x"',
        "default[2]": "u0000",
        "untrusted[0]": '""',
        "untrusted[1]": '"A=B"',
        "entry_points[0]": '"bin"',
        "type": "nfs",
    }
    assert expected.get(leaf, leaf.split("[")[0]) in shown, (message, shown)


@pytest.mark.parametrize(
    ("text", "line"),
    [('{\n  "a": 1,\n}', 3), ('{\n "process": {\n  "x" 1}}', 3), ("[1, 2", 1), ('{"a": tru}', 1)],
)
def test_json_syntax_errors_give_the_line(text, line):
    with pytest.raises(FormatError) as err:
        parse_config(text, "Occlum.json")
    assert str(err.value).startswith(f"Occlum.json:{line}:")


def test_sizes():
    assert parse_size("32MB") == 32 << 20
    assert parse_size("1GB") == 1 << 30
    assert parse_size("4k") == 4096
    assert parse_size("12") == 12
    assert parse_size("1.5MB") is None


@pytest.mark.parametrize(
    ("path", "ok"),
    [
        ("/bin/app", True),
        ("/bin/sub/app", True),
        ("/bin", True),
        ("/binx/app", False),
        ("/bin/../etc/x", False),
        ("/bin/./app", False),
        ("bin/app", False),
        ("/usr/bin/python3", True),
        ("/usr/binx", False),
    ],
)
def test_entry_points_are_component_wise_prefixes(path, ok):
    entries = ["/bin", "/usr/bin/"]
    if ok:
        check_entry_point(path, entries)
    else:
        with pytest.raises(UsageError):
            check_entry_point(path, entries)


def test_env_is_default_plus_named_untrusted_host_variables():
    config = parse_config(
        json.dumps({"env": {"default": ["A=1", "B=x=y"], "untrusted": ["B", "C"]}}), "x"
    )
    env = program_env(config, {"B": "host", "C": "c", "D": "never"})
    assert env == {"A": "1", "B": "host", "C": "c"}
    assert program_env(config, {}) == {"A": "1", "B": "x=y"}
