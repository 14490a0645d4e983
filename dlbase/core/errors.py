"""User-facing errors: the CLI prints their one-line message and exits with status 2."""


def one_line(text: str) -> str:
    """The message as one printable line: newlines, tabs and other control characters escaped, since they come
    from the user's own text (a --set value, a key, a file name)."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


class DlbaseError(Exception):
    """A mistake in the user's input (config, data, checkpoint, paths): shown as one line, exit 2."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(one_line(message))


class ConfigError(DlbaseError):
    """A config file or --set value that does not validate."""


class DataError(DlbaseError):
    """Missing, malformed or unexpected dataset files."""


class CheckpointError(DlbaseError):
    """A checkpoint that cannot be read, or cannot be written."""


class TrainingDiverged(DlbaseError):
    """The training loss became NaN or infinite; the checkpoints on disk keep the last finite weights."""

    exit_code = 3


class SweepStopped(DlbaseError):
    """SIGTERM/SIGINT during a sweep: the running trial is saved, and the sweep resumes when rerun."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code
