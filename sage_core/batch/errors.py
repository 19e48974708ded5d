"""Errors of the batch renderer."""
from __future__ import annotations


class BatchError(Exception):
    """Bad input found before anything is queued (the command exits with one clear message, status 2)."""


class ServerError(Exception):
    """A server could not be reached or stopped answering (the job goes back to the queue)."""


class JobError(Exception):
    """A job was refused or failed on a server that is still alive (the job is retried, then recorded failed)."""

    def __init__(self, message: str, details=None):
        super().__init__(message)
        self.details = details
