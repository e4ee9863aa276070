"""Exception types shared across stages.

A `PageError` is per-URL failure, recorded on the URL's queue row as data; anything else that
escapes a stage (database down, bug) is infrastructure failure and fails the Airflow task so
Airflow retries it.
"""

from __future__ import annotations


class BlogqaError(Exception):
    """Base class for errors raised by blogqa."""


class ConfigError(BlogqaError):
    """A setting is missing or malformed; the message names the variable to fix."""


class SchemaMismatchError(ConfigError):
    """The database was built for different settings than the current ones (a retry with
    the same settings finds the same)."""


class ExtractionPoolError(BlogqaError):
    """The extraction workers cannot run: one could not start, or they keep dying whatever the
    page. This is the environment's fault, not the pages', so it fails the task (Airflow
    retries it) instead of being recorded against every URL of the chunk."""


class StageStalledError(BlogqaError):
    """No item of a stage finished for BLOGQA_STAGE_STALL_SECONDS. Raised so the task fails
    (and is retried) at once instead of hanging until Airflow's execution_timeout, which a
    process stuck in C code may never honour."""


class PageError(BlogqaError):
    """One URL could not be processed at one stage.

    `permanent` errors (404, not HTML, nothing extractable, blocked address) go straight to a
    terminal status; transient ones (timeouts, 5xx, 429) are retried with backoff.
    `terminal_status` picks `dead` or `skipped` for permanent errors.
    """

    def __init__(
        self,
        message: str,
        *,
        stage: str,
        permanent: bool,
        terminal_status: str = "dead",
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.stage = stage
        self.permanent = permanent
        self.terminal_status = terminal_status
        self.retry_after = retry_after

    def __reduce__(self):
        """Keyword-only fields survive pickling (errors raised in extraction processes)."""
        return (
            _rebuild_page_error,
            (
                type(self),
                str(self),
                self.stage,
                self.permanent,
                self.terminal_status,
                self.retry_after,
            ),
        )


def _rebuild_page_error(cls, message, stage, permanent, terminal_status, retry_after):
    error = PageError.__new__(cls)
    PageError.__init__(
        error,
        message,
        stage=stage,
        permanent=permanent,
        terminal_status=terminal_status,
        retry_after=retry_after,
    )
    return error
