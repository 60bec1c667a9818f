"""Image-layer commands: mkimage, digest, verify, ls, cat, stat."""

COMMANDS: list = []
