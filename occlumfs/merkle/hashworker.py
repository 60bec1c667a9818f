"""The hashing worker of :mod:`occlumfs.merkle.hashers`, run as a script.

It imports a few built-in modules only (its start-up is paid on the reader's
machine: ``signal`` would load ``enum``, ``hashlib`` all its constructors) and
is started as
``python -I -S hashworker.py IMAGE_FD AREA_FD ASK_FD ANSWER_FD BLOCK SLOT_BYTES HASHES_BASE``,
with those descriptors inherited: the image, a memfd holding the shared slots,
and its two pipes, which all workers share (an ask, a few bytes written whole,
is read whole by one of them). It first answers ``READY`` (the server does not wait for
it: until then it verifies on its own thread), then each ask "slot, first
block, count" by reading the blocks into the slot and writing the SHA-256 of
each block at the slot's place in the hash area, then "slot, ok". It exits
at end of file on its pipe: when the server closes it or dies.
"""

import _signal
import mmap
import os
import struct
import sys

try:
    from _hashlib import openssl_sha256 as sha256  # what hashlib.sha256 is, without hashlib
except ImportError:  # pragma: no cover - a Python built without OpenSSL
    from hashlib import sha256

ASK = struct.Struct("<IQI")  # slot, first image block, block count
DONE = struct.Struct("<II")  # slot, 1 if the whole window was read and hashed
READY = DONE.pack(0xFFFFFFFF, 1)  # the first answer: up and waiting for asks
HASH_SIZE = 32


def main(argv: list[str]) -> int:
    image, area_fd, ask, answer, block, slot_bytes, hashes_base = map(int, argv)
    # Ctrl-C reaches the whole process group: unmounting is the server's job.
    _signal.signal(_signal.SIGINT, _signal.SIG_IGN)
    _signal.pthread_sigmask(_signal.SIG_SETMASK, set())
    area = memoryview(mmap.mmap(area_fd, 0))
    os.close(area_fd)
    window_blocks = slot_bytes // block
    os.write(answer, READY)
    while True:
        got = os.read(ask, ASK.size)
        if len(got) != ASK.size:
            return 0  # end of file: the server closed the pipe or died
        slot, first, count = ASK.unpack(got)
        data = area[slot * slot_bytes : slot * slot_bytes + count * block]
        try:
            ok = os.preadv(image, [data], first * block) == len(data)
        except OSError:
            ok = False
        if ok:
            at = hashes_base + slot * window_blocks * HASH_SIZE
            # One join and one store a window, not one store a block (~3% less CPU).
            area[at : at + count * HASH_SIZE] = b"".join(
                [sha256(data[off : off + block]).digest() for off in range(0, len(data), block)]
            )
        data.release()
        os.write(answer, DONE.pack(slot, ok))


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except BrokenPipeError:
        sys.exit(0)  # the server went away between an ask and its answer
