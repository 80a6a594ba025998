"""The one exception type the command line turns into a one-line message and exit code 2."""


class GidError(Exception):
    """A problem with the user's input (config, data, checkpoint) that they can fix.

    The message is a single line saying what is wrong and how to fix it.
    """


# What str.splitlines breaks a line at: a message holding one (a path or value the user typed) stays one line.
_LINE_BREAKS = str.maketrans({c: c.encode("unicode_escape").decode() for c in "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"})


def one_line(text: str) -> str:
    """``text`` with its line breaks escaped (``\\n``, ``\\u2028``...), so it prints as one line."""
    return text.translate(_LINE_BREAKS)


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (a dependency's own may run to pages), or its type."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
