"""Every exception users can catch, and the exit codes of the ``blipkit`` command.

Each error class carries the exit code the command returns for it: 2 for a mistake in what was asked (a
bad argument, image, checkpoint or config), 1 for a problem of the environment (a missing package, device
or port, an output another run holds). Anything else that escapes is a crash: exit 1 with a traceback hint.
"""

from __future__ import annotations

EXIT_OK = 0  # all done
EXIT_CRASH = 1  # a crash, or the environment cannot do what was asked
EXIT_USAGE = 2  # a usage error: the input or the arguments are wrong
EXIT_SOME_FAILED = 3  # finished, with some failed items (each reported)
EXIT_INTERRUPTED = 130  # Ctrl-C


class BlipkitError(Exception):
    """Base class of blipkit's errors; ``str()`` says what is wrong and, where it helps, what to do."""

    exit_code = EXIT_USAGE


class UsageError(BlipkitError, ValueError):
    """A mistake in what the user asked for (an argument, a flag value, an empty input)."""


class ConfigError(BlipkitError, ValueError):
    """A model or training config that cannot be used; names the field and what it should be."""


class CheckpointError(BlipkitError, ValueError):
    """A checkpoint that does not fit the model: names the missing, unexpected or mis-shaped keys."""


class ImageError(BlipkitError, ValueError):
    """An image that cannot be read; ``str()`` names the item and the reason."""

    def __init__(self, item: str, reason: str):
        super().__init__(item, reason)  # both in args so the error pickles across processes
        self.item = item
        self.reason = reason

    def __str__(self) -> str:
        return f"cannot read image '{self.item}': {self.reason}"


class DataError(BlipkitError, ValueError):
    """A dataset file (captions, VQA rows) that cannot be read; names the file and row."""


class CapabilityError(BlipkitError, RuntimeError):
    """The loaded checkpoint lacks the part a call needs (e.g. retrieval on a generation-only model)."""


class ResumeError(BlipkitError, RuntimeError):
    """The output folder and ``--resume`` disagree (a finished or foreign run, or nothing to resume)."""


class EnvironmentProblem(BlipkitError, RuntimeError):
    """The machine cannot do what was asked: a missing package, device or port; exit code 1."""

    exit_code = EXIT_CRASH


class AssetError(EnvironmentProblem):
    """A packaged asset of the embedded default model is missing or unreadable."""


class MissingExtra(EnvironmentProblem, ModuleNotFoundError):
    """An optional dependency is not installed; says which extra brings it."""


def missing_extra(feature: str, package: str, extra: str) -> MissingExtra:
    """The error for ``feature`` needing ``package``, naming the extra that brings it."""
    return MissingExtra(f"{feature} needs {package}: pip install 'blipkit[{extra}]'")


class OutputLocked(EnvironmentProblem):
    """Another run is writing the same output; names its pid and host (from ``<out>.lock``)."""


class OutputWriteError(EnvironmentProblem):
    """Writing the output failed (e.g. a full disk); the output is as it was before the failed write."""
