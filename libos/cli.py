"""The ``occlum`` command (placeholder until the libos issue)."""

import click


@click.group()
def main() -> None:
    """Run unmodified apps on protected storage: new, build, run."""
