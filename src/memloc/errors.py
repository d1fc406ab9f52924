"""The one error type users see.

Every problem with a user's input (data, names, fractions, run directories,
checkpoints) raises a subclass of :class:`MemlocError` whose message is one
line naming the problem and what to do. The CLI prints it and exits with 2.
"""


class MemlocError(Exception):
    """Bad input or a state memloc cannot work from; the message says the fix."""


class DataError(MemlocError):
    """Missing, corrupt or inconsistent data, labels, masks or score files."""


class ConfigError(MemlocError):
    """An unknown name or a value out of range in a config or a flag."""


class RunError(MemlocError):
    """A run directory that is missing, foreign, of another version, or would be overwritten."""
