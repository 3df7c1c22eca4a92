"""Errors that mean "the user's input is wrong": each message is one line meant for the user.

The command lines print `error: <message>` for any UserError and exit with status 2; anything
else is a bug and keeps its traceback.
"""


class UserError(ValueError):
    """Bad input of any kind; the message is one line for the user."""


class ConfigError(UserError):
    """A bad config file, key or value."""


class DataError(UserError):
    """A problem with the user's data or data options."""


class ModelError(UserError):
    """A model name or argument that timm cannot build."""


class LaunchError(UserError):
    """The launcher and the process group disagree."""
