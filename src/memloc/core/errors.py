"""The one error type users see, and the one way the library warns.

Every problem with a user's input (data, names, fractions, run directories,
checkpoints) raises a subclass of :class:`MemlocError` whose message is one
line naming the problem and what to do. The CLI prints it and exits with 2.
What memloc decided for a caller who gave it no log (a default count shrunk to
the data, a suspicious pixel range) is one `warn` line: a Python UserWarning.
"""

import os
import sys
import warnings


class MemlocError(Exception):
    """Bad input or a state memloc cannot work from; the message says the fix."""


class DataError(MemlocError):
    """Missing, corrupt or inconsistent data, labels, masks or score files."""


class ConfigError(MemlocError):
    """An unknown name or a value out of range in a config or a flag."""


class RunError(MemlocError):
    """A run directory that is missing, foreign, of another version, or would be overwritten."""


def warn(line: str) -> None:
    """`line` as a UserWarning attributed to the first frame outside memloc: the caller's line that asked for it."""
    package = os.path.dirname(os.path.abspath(__file__)) + os.sep
    level, frame = 1, sys._getframe(0)  # stacklevel 1 is this function
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package):
        level, frame = level + 1, frame.f_back
    warnings.warn(line, UserWarning, stacklevel=level)
