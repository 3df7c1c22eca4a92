"""The one error type of the data layer: bad user input, told in one line."""


class DataError(ValueError):
    """A problem with the user's data or data options; the message is one line for the user.

    The command line prints just `error: <message>` and exits with status 2.
    """
