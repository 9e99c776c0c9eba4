"""The `leafe` command."""

from leafe.cli.app import app, main

__all__ = ["app", "main"]
