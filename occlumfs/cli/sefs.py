"""SEFS commands: sefs create/info/passwd, fsck."""

COMMANDS: list = []
