"""Errors a user can act on. The CLI prints them as one line, without a traceback."""


class NoisyRolloutError(Exception):
    """Base class for errors caused by input or configuration, not by a bug."""


class DataError(NoisyRolloutError):
    """A dataset file or row is unusable. The message names the file and the row."""


class ConfigError(NoisyRolloutError):
    """params.yaml or a command-line override is invalid."""
