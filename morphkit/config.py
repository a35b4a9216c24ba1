"""Settings files: one JSON or TOML reader for every job's settings dataclass (`--config`)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import ConfigError


def printable(text: str) -> str:
    """`text` with every control or non-printable character escaped: safe to show on a terminal or a page."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


def read_config(path: str | os.PathLike, known: set[str]) -> dict:
    """Read a JSON or TOML file into a dict of settings; keys may use '-' or '_', and every key must be known."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"The config file {path} does not exist.")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib
            values = tomllib.loads(text)
        elif path.suffix.lower() == ".json":
            values = json.loads(text)
        else:
            raise ConfigError(f"The config file {path} must end in .json or .toml.")
    except (ValueError, TypeError) as e:  # JSONDecodeError and TOMLDecodeError are ValueErrors
        raise ConfigError(f"The config file {path} could not be parsed: {e}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"The config file {path} must hold a table of settings.")
    values = {str(k).replace("-", "_"): v for k, v in values.items()}
    if unknown := sorted(set(values) - known):
        raise ConfigError(f"The config file {path} has unknown settings: {', '.join(map(printable, unknown))}. "
                          f"Known: {', '.join(sorted(known))}.")
    return values
