"""Errors that reach the user as one clear line (exit code 2), never as a traceback."""

from __future__ import annotations


class UserError(Exception):
    """Bad input or environment: the message names the file, record or value."""

    exit_code = 2
