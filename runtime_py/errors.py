"""Named errors shared by the runtime and the exporter.

Every error a user can cause is one of these. The CLI prints ``str(err)`` as one line on stderr
and exits with ``err.exit_code``: 2 for bad input, 1 for a failed gate.
"""


class CosmoeError(Exception):
    """Base of every error the tool reports to a user (bad input: exit code 2)."""

    exit_code = 2


class ConfigError(CosmoeError):
    """A model config has missing, unknown or impossible values."""


class FormatError(CosmoeError):
    """A file does not follow its format (safetensors header, manifest, bundle layout)."""


class IntegrityError(CosmoeError):
    """A file's bytes differ from what the manifest recorded (size or sha256)."""


class GateFailed(CosmoeError):
    """A quality or speed gate failed: the input was fine, the result is not good enough."""

    exit_code = 1
