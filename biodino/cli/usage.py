"""The command line's usage error: bad input from the user, reported in one line with exit code 2."""


class UsageError(Exception):
    """Bad input from the user: reported in one line, exit code 2, nothing written."""
