"""Errors a user can act on. `featbench` shows these as one line (exit code 2);
anything else is a bug and keeps its traceback."""

from __future__ import annotations


def error_line(err: BaseException) -> str:
    """`<Type>: <message>` on one line, for logs and failure records: a message that begins
    with a newline (or spans several) keeps its words instead of reading `RuntimeError: `."""
    message = " ".join(str(err).split())
    return f"{type(err).__name__}: {message}" if message else type(err).__name__


class FeatbenchError(Exception):
    """Base of every user-facing featbench error."""


class ConfigError(FeatbenchError, ValueError):
    """A config value that is not allowed; the message names it and what is."""


class ModelUnavailable(FeatbenchError, RuntimeError):
    """The model cannot be loaded here (no hub, unknown name, missing files, no GPU)."""


class JudgeUnreachable(FeatbenchError):
    """The judge's endpoint refused the connection, did not answer, or refused the key,
    found by one request before any model loads."""


class JudgeFailures(FeatbenchError):
    """More of a job's judgements failed than `judge_failure_limit` allows: its results are
    written, but the job is marked failed (failed.json) and a rerun runs it again."""


class SweepFailed(SystemExit):
    """Raised when a sweep ends with failed jobs: the end-of-sweep callback's verdict, with
    the exit code the sweep ends with (the largest of its jobs': 2 for a configuration or
    data error, 1 for a bug). A SystemExit, because Hydra swallows (warns about) any
    Exception a callback raises and only a SystemExit reaches the entry point, where
    `bench.cli.featbench.run_main` turns it into its return code."""

    def __init__(self, exit_code: int, failed: int) -> None:
        super().__init__(exit_code)
        self.exit_code, self.failed = exit_code, failed
