"""The conformance suite: POSIX behaviour every occlumfs filesystem shares (see README.md)."""
