"""The ``mias-sam`` command: subcommands (:mod:`.commands`), files kept for the user (:mod:`.manage`)
and a console progress line."""

from .commands import main

__all__ = ["main"]
