"""Errors a user can act on. The CLI prints them as one line, without a traceback."""


class NoisyRolloutError(Exception):
    """Base class for errors caused by input or configuration, not by a bug."""


class DataError(NoisyRolloutError):
    """A dataset file or row is unusable. The message names the file and the row."""


class ConfigError(NoisyRolloutError):
    """params.yaml or a command-line override is invalid."""


class LearnerLost(NoisyRolloutError):
    """A learner process died or its node was lost (not an error in its code): the driver may restart the group
    and resume from the newest checkpoint (`cluster.max_restarts`)."""
