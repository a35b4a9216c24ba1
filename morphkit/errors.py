"""The errors morphkit raises on purpose.

Every one of them carries a message written for the person at the keyboard: what was wrong and
what to do about it. The CLI prints that message (no traceback) and exits with `exit_code`.
Anything else that escapes is a bug in morphkit.
"""


def brief(error: BaseException | str, limit: int = 200) -> str:
    """The first line of an error (another library's, quoted in one of ours), cut at the last word that fits in
    `limit` characters, with "…" where it was cut; an error that says nothing gives its type's name."""
    lines = str(error).strip().splitlines()
    text = lines[0] if lines else "" if isinstance(error, str) else type(error).__name__
    if len(text) <= limit:
        return text
    return text[:limit].rsplit(" ", 1)[0].rstrip(" ,;:(") + " …"


class MorphkitError(Exception):
    """Base class: a problem the user can fix, explained in one paragraph."""

    exit_code = 1


class InputError(MorphkitError):
    """An input file (image, dataset, LoRA) is missing, unreadable or malformed."""

    exit_code = 2


class ConfigError(MorphkitError):
    """A setting is out of range or contradicts another."""

    exit_code = 2


class ModelNotFoundError(MorphkitError):
    """The base model (or ControlNet) could not be found or loaded."""

    exit_code = 3


class OutputExistsError(MorphkitError):
    """An output already exists and `overwrite` was not given."""

    exit_code = 4


class LoRAError(MorphkitError):
    """A LoRA file does not fit the model or is not a LoRA at all."""

    exit_code = 2


class Cancelled(MorphkitError):
    """The job was cancelled by its caller (the web UI's Cancel button, for one)."""

    exit_code = 130


class DiskFullError(MorphkitError):
    """A file could not be written completely: the disk (or a quota, or a file size limit) is full."""

    exit_code = 1


class NumericalError(MorphkitError):
    """A stage produced NaN or infinite values; nothing of it was written or cached."""

    exit_code = 1
