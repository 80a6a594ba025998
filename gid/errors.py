"""The one exception type the command line turns into a one-line message and exit code 2."""


class GidError(Exception):
    """A problem with the user's input (config, data, checkpoint) that they can fix.

    The message is a single line saying what is wrong and how to fix it.
    """


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (a dependency's own may run to pages), or its type."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
