"""The ``occlum`` instance tooling: new, build, run, over occlumfs's layers.

See docs/libos.md. The enclave is simulated: a bubblewrap sandbox whose root
is the union of a verified image layer and an encrypted SEFS store.
"""

__version__ = "0.1.0"
