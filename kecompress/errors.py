"""The one exception type the toolkit raises for problems a user can fix."""


class KecompressError(Exception):
    """A problem with the user's input, with a message that names the problem and the fix.

    The command line prints the message on one line and exits with status 2; code that
    calls the Python API can catch it like any other exception.

    Example:
        >>> raise KecompressError("rate must be in (0, 1], got 1.5: pass e.g. --rate 0.5")
        Traceback (most recent call last):
        ...
        kecompress.errors.KecompressError: rate must be in (0, 1], got 1.5: pass e.g. --rate 0.5
    """
