"""The one exception type users see.

Every input problem (bad config, missing data, corrupt checkpoint, mismatched tokenizer or
architecture, bad branch name ...) raises ``PoelmError`` with one line that names the problem and
what to do. The CLI prints ``error: <line>`` and exits with code 2, without a traceback.
"""


class PoelmError(Exception):
    """A user-facing error: one clear line, exit code 2."""

    exit_code = 2


class ConfigError(PoelmError):
    pass


class DataError(PoelmError):
    pass


class CheckpointError(PoelmError):
    pass


class PublishError(PoelmError):
    pass
