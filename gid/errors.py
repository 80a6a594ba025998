"""The one exception type the command line turns into a one-line message and exit code 2."""


class GidError(Exception):
    """A problem with the user's input (config, data, checkpoint) that they can fix.

    The message is a single line saying what is wrong and how to fix it.
    """
