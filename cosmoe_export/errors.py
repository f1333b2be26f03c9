"""Exporter errors: the runtime's named errors plus those only the exporter raises."""

from runtime_py.errors import ConfigError, CosmoeError, FormatError, GateFailed, IntegrityError


class CheckpointError(CosmoeError):
    """A source checkpoint is unreadable, incomplete, or disagrees with its config."""


class UnsupportedArchitecture(CosmoeError):
    """The checkpoint's architecture has no registered adapter."""


__all__ = ["CheckpointError", "ConfigError", "CosmoeError", "FormatError", "GateFailed", "IntegrityError",
           "UnsupportedArchitecture"]
