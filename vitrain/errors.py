"""Errors a user can act on.

Anything raised as :class:`VitrainError` is shown by the command-line entry points as one line
(``error: ...``) with a non-zero exit code and no traceback; the message names the setting to change.
:class:`Preempted` is not an error: a run stopped by a signal, with its checkpoint written.
"""

import importlib
import signal
from pathlib import Path
from types import ModuleType


class VitrainError(Exception):
    """Base class for errors caused by the user's input rather than by a bug."""


class ConfigError(VitrainError, ValueError):
    """A setting is invalid: unknown model, bad image size, non-positive value, ..."""


class DataError(VitrainError, FileNotFoundError):
    """A data set is missing, cannot be downloaded or cannot be read."""


class NonFiniteLoss(VitrainError):
    """The loss became NaN or infinite; nothing was stepped or saved from it."""


class Preempted(Exception):
    """SIGTERM or SIGINT arrived: the step finished, a checkpoint was written, the run should exit."""

    def __init__(self, signum: int, step: int, checkpoint: Path) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; checkpoint {checkpoint}")
        self.signum, self.step, self.checkpoint = signum, step, checkpoint


def first_line(error: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (its type's name when it has none), at most ``limit``
    characters. A message that a data loader worker wrapped in a traceback ("Caught DataError in
    DataLoader worker ...") gives the original message, its last line."""
    text = str(error).strip()
    if "Traceback" in text:
        text = text.splitlines()[-1].split(": ", 1)[-1]
    return text.splitlines()[0][:limit] if text else type(error).__name__


def first_sentence(error: BaseException, limit: int = 160) -> str:
    """The first sentence of an exception's first line, for a message of our own around it: longer than ``limit``,
    it is cut after a whole word and ends in "...", so that no word is left half."""
    text = first_line(error, limit=10_000).split(". ")[0].rstrip(".")
    return text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0] + " ..."


def import_extra(module: str, purpose: str, extra: str) -> ModuleType:
    """The optional package ``module``, or a one-line error: ``purpose`` needs it, and the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise VitrainError(f'{purpose} needs {module}: pip install "vitrain[{extra}]" (or pip install {module})') from e
