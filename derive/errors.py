"""The project's exception hierarchy.

Every error a user can cause or meet carries a message that names the offending value and says what
to do; the CLI maps each class to an exit code (see ``derive.cli``) and never shows a traceback for
them.
"""

from __future__ import annotations


class DeriveError(Exception):
    """Base class of every error the project raises on purpose."""

    exit_code = 1


class UsageError(DeriveError):
    """A command-line value is malformed (a duration, a timestamp, a UUID)."""

    exit_code = 2


class ConfigError(DeriveError):
    """A settings or rules file is invalid."""

    exit_code = 2


class SourceError(DeriveError):
    """The database could not be reached or answered with an error; usually transient."""

    exit_code = 1


class ContractError(DeriveError):
    """Input data breaks its contract (for example an ingestion file that is not JSON)."""

    exit_code = 1


class SchemaError(DeriveError):
    """The database schema is missing pieces or differs from what the migrations create."""

    exit_code = 1


class LockBusy(DeriveError):
    """Another run of the same job holds the advisory lock; this run was skipped."""

    exit_code = 75
