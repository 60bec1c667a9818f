"""occlumfs: protected storage for unmodified apps.

Three filesystems share one contract (:mod:`occlumfs.fs`) and one FUSE adapter
(:mod:`occlumfs.adapter`): verified read-only image layers (:mod:`occlumfs.merkle`),
a writable encrypted filesystem (:mod:`occlumfs.sefs`) and a union of them
(:mod:`occlumfs.unionfs`).
"""

__version__ = "0.1.0"
