"""The exec client's own JSON (libos/protocol.py imports no json): what the server reads."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from libos.protocol import decode, encode

# Environment values may carry undecodable bytes as lone surrogates (os.environ).
TEXT = st.text(st.characters(codec=None, exclude_categories=()), max_size=40)


@given(
    argv=st.lists(TEXT, min_size=1, max_size=5),
    env=st.dictionaries(TEXT, TEXT, max_size=8),
    cwd=st.none() | TEXT,
    status=st.integers(0, 255),
)
def test_requests_read_back_as_json_does(argv, env, cwd, status):
    request = {"op": "exec", "argv": argv, "env": env, "cwd": cwd, "set": {}, "n": status}
    line = encode(request)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert json.loads(line) == request


def test_answers_decode_as_json_does():
    for answer in ({"status": 0}, {"status": 143}, {"error": 'a "quoted" é', "code": 14}):
        assert decode(json.dumps(answer).encode() + b"\n") == answer
    assert decode(b'{"status": 7}') == {"status": 7}
