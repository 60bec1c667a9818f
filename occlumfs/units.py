"""The block size of the filesystem contract (:mod:`occlumfs.fs`) and of the
formats, defined once. A module of its own so that what needs only the number
(the image format, and so ``occlumfs mkimage``) need not load the contract."""

BLOCK_SIZE = 4096  # the goldens pin it
