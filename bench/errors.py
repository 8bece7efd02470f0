"""Errors a user can act on. `featbench` shows these as one line (exit code 2);
anything else is a bug and keeps its traceback."""

from __future__ import annotations


class FeatbenchError(Exception):
    """Base of every user-facing featbench error."""


class ConfigError(FeatbenchError, ValueError):
    """A config value that is not allowed; the message names it and what is."""
