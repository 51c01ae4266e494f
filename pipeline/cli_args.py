"""The argument parser of every command, core or domain: a usage error is one line and exit 2."""

from __future__ import annotations

import argparse

from pipeline.errors import ConfigError


class CommandParser(argparse.ArgumentParser):
    """``json_help``: add the ``--json`` flag the core CLI passes on to domain commands."""

    def __init__(self, *, json_help: str | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        if json_help:
            self.add_argument("--json", action="store_true", help=json_help)

    def error(self, message: str):
        raise ConfigError(f"{self.prog}: {message}")
