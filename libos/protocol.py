"""The client side of a started instance's socket, light enough to start fast.

``occlum exec`` is on the latency path of every program run in a started
instance, so ``occlum exec`` (libos/entry.py) and ``python -m libos exec``
come here without importing click, trio or the filesystem stack, and this
module imports only C modules of the standard library (``_socket``,
``_signal``, ``_json``: no ``socket``, ``json``, ``signal`` or ``enum``, a few
ms of a ~25 ms exec) and :mod:`occlumfs.errors`. The rest of the client is
libos/control.py.
"""

from __future__ import annotations

import _signal
import _socket
import os
import sys
from _json import encode_basestring_ascii

from occlumfs.errors import NotFoundError, OcclumfsError, UsageError

SOCKET_NAME = "occlum.sock"
NOT_STARTED = "the instance is not started (occlum start)"
DEFAULT_STOP_TIMEOUT = 3.0
# What occlum run and occlum exec pass on to their programs.
FORWARDED = (
    _signal.SIGINT,
    _signal.SIGQUIT,
    _signal.SIGWINCH,
    _signal.SIGTERM,
    _signal.SIGHUP,
    _signal.SIGUSR1,
    _signal.SIGUSR2,
)


class ServerError(OcclumfsError):
    """An error the server reported, with its exit code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.exit_code = code


class in_run_dir:
    """``with in_run_dir(run_dir) as address``: the socket's address, whatever the
    length of the instance's path."""

    def __init__(self, run_dir: os.PathLike | str) -> None:
        self.fd = os.open(run_dir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)

    def __enter__(self) -> str:
        return f"/proc/self/fd/{self.fd}/{SOCKET_NAME}"

    def __exit__(self, *_exc) -> None:
        os.close(self.fd)


def connect_raw(run_dir: os.PathLike | str) -> _socket.socket | None:
    """A connection to the server (a bare ``_socket.socket``), or None when nobody answers."""
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
    try:
        with in_run_dir(run_dir) as address:
            sock.connect(address)
        return sock
    except (FileNotFoundError, ConnectionRefusedError):
        sock.close()
        return None
    except OSError:
        sock.close()
        raise


def try_connect(run_dir: os.PathLike | str):
    """A connection to the server (a ``socket.socket``), or None when nobody answers."""
    import socket

    sock = connect_raw(run_dir)
    return None if sock is None else socket.socket(fileno=sock.detach())


def read_answer(sock) -> dict | None:
    """The server's one-line answer (None at end of file)."""
    line = b""
    while not line.endswith(b"\n"):
        data = sock.recv(4096)
        if not data:
            break
        line += data
    return decode(line) if line else None


def encode(value) -> bytes:
    """JSON for what requests hold (str, int, None, lists and dicts of them), one line."""
    return _encode(value).encode() + b"\n"


def _encode(value) -> str:
    if isinstance(value, str):
        return encode_basestring_ascii(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_encode(k)}: {_encode(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(map(_encode, value)) + "]"
    if value is None:
        return "null"
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise TypeError(f"cannot encode {type(value).__name__}")


def decode(line: bytes) -> dict | None:
    """An answer line; ``{"status": N}``, the common one, without importing json."""
    head, _, rest = line.strip().partition(b'{"status": ')
    if not head and rest.endswith(b"}") and rest[:-1].isdigit():
        return {"status": int(rest[:-1])}
    import json

    return json.loads(line)


def raise_if_error(answer: dict) -> dict:
    if "error" in answer:
        raise ServerError(answer["error"], int(answer.get("code", 1)))
    return answer


def _stdio() -> list[int]:
    """Our fds 0, 1, 2 to hand over (``/dev/null`` for a closed one)."""
    fds = []
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
            fds.append(fd)
        except OSError:
            fds.append(os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC))
    return fds


EXEC_USAGE = "occlum exec [-w DIR] [-e NAME[=VALUE]]... [--] /path ARGS..."
_CWD_FLAGS = ("-w", "--cwd", "--workdir")
_ENV_FLAGS = ("-e", "--env")


def parse_exec_args(args: list[str]) -> tuple[list[str], dict]:
    """``[-w DIR] [-e NAME[=VALUE]]... [--] PROGRAM ARGS...``: the program's argv, and
    the request's ``cwd`` and ``set`` (variables given with -e, as Docker's exec
    takes them; ``-e NAME`` alone passes the caller's own value, if it has one)."""
    options: dict = {"cwd": None, "set": {}}
    i = 0
    while i < len(args) and args[i].startswith("-") and args[i] != "-":
        flag, value = args[i], None
        if flag == "--":
            i += 1
            break
        if flag.startswith("--") and "=" in flag:
            flag, value = flag.split("=", 1)
        elif not flag.startswith("--") and len(flag) > 2:
            flag, value = flag[:2], flag[2:]
        if flag not in _CWD_FLAGS + _ENV_FLAGS:
            raise UsageError(f"exec: unknown option {flag}; usage: {EXEC_USAGE}")
        if value is None:
            i += 1
            if i == len(args):
                raise UsageError(f"exec: {flag} needs a value; usage: {EXEC_USAGE}")
            value = args[i]
        i += 1
        if flag in _CWD_FLAGS:
            options["cwd"] = value
            continue
        name, has_value, given = value.partition("=")
        if not name:
            raise UsageError(f"exec: {flag} {value!r}: no variable name")
        if has_value:
            options["set"][name] = given
        elif name in os.environ:
            options["set"][name] = os.environ[name]
    return args[i:], options


def exec_program(root: str, args: list[str]) -> int:
    """Run ``args`` (options, then the program and its arguments; see
    :func:`parse_exec_args`) in the instance at ``root`` with our stdio; its status."""
    argv, options = parse_exec_args(args)
    if not argv:
        raise UsageError(f"exec: no program given; usage: {EXEC_USAGE}")
    run_dir = os.path.join(root, "run")
    sock = connect_raw(run_dir) if os.path.isdir(run_dir) else None
    if sock is None:
        from libos.control import recover
        from libos.instance import Instance

        recover(Instance.find(root))  # a server that died: say so, clean up
        raise NotFoundError(f"{root}: {NOT_STARTED}")
    try:
        message = encode({"op": "exec", "argv": argv, "env": dict(os.environ), **options})
        fds = b"".join(fd.to_bytes(4, sys.byteorder) for fd in _stdio())
        sent = sock.sendmsg([message], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, fds)])
        if sent < len(message):  # a large environment
            sock.sendall(message[sent:])

        def forward(signum, _frame):
            try:  # noqa: SIM105 (contextlib is one import more)
                sock.sendall(b'{"signal": %d}\n' % signum)
            except OSError:
                pass

        saved = {s: _signal.signal(s, forward) for s in FORWARDED}
        try:
            answer = read_answer(sock)
        finally:
            for signum, handler in saved.items():
                _signal.signal(signum, handler)
    finally:
        sock.close()
    if answer is None:
        raise OcclumfsError(f"{root}: the instance's server died during the exec")
    return int(raise_if_error(answer)["status"])


def exec_main(args: list[str]) -> None:
    """``occlum exec [OPTIONS] [--] CMD ARGS...`` without click: one-line errors, the
    program's status."""
    root = os.path.abspath(".")
    try:
        if not os.path.isfile(os.path.join(root, "Occlum.json")):
            raise NotFoundError(
                f"{root}: not an Occlum instance (no Occlum.json); run 'occlum init'"
            )
        status = exec_program(root, args)
    except OcclumfsError as exc:
        print(f"occlum: error: {exc}", file=sys.stderr)
        sys.exit(int(exc.exit_code))
    sys.exit(status)
