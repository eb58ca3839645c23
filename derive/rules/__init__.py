"""Packaged, versioned rules files."""

from importlib.resources import files
from pathlib import Path


def canonical_rules_path() -> Path:
    """Path of the packaged canonical rules file."""
    return Path(str(files(__name__).joinpath("canonical.toml")))
