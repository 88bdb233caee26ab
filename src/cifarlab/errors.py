"""cifarlab's own exceptions.

Every error a user can cause (bad config, bad data path, unreadable image ...)
is raised as a :class:`CifarlabError`; the CLI turns it into a one-line message
and exit status 2 instead of a traceback.
"""


class CifarlabError(Exception):
    """Base class for errors caused by user input; the CLI prints them on one line."""


class ConfigError(CifarlabError, ValueError):
    """An invalid configuration: unknown key, wrong type, value out of range."""


class DataError(CifarlabError):
    """The data cannot be found, read, verified or decoded."""


class CheckpointError(CifarlabError):
    """A checkpoint or weight file does not match, is corrupt or unsafe."""
