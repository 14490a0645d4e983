"""User-facing errors: the CLI prints their one-line message and exits with status 2."""


class DlbaseError(Exception):
    """A mistake in the user's input (config, data, checkpoint, paths): shown as one line, exit 2."""

    exit_code = 2


class ConfigError(DlbaseError):
    """A config file or --set value that does not validate."""


class DataError(DlbaseError):
    """Missing, malformed or unexpected dataset files."""


class CheckpointError(DlbaseError):
    """A checkpoint that cannot be read, or cannot be written."""
