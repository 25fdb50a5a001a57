"""Errors a user can act on.

Anything raised as :class:`VitrainError` is shown by the command-line entry points as one line
(``error: ...``) with a non-zero exit code and no traceback; the message names the setting to change.
"""


class VitrainError(Exception):
    """Base class for errors caused by the user's input rather than by a bug."""


class ConfigError(VitrainError, ValueError):
    """A setting is invalid: unknown model, bad image size, non-positive value, ..."""


class DataError(VitrainError, FileNotFoundError):
    """A data set is missing, cannot be downloaded or cannot be read."""
