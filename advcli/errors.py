"""Errors the CLI turns into exit codes: InputError is the user's to fix (exit 2)."""


class InputError(Exception):
    """Bad input or bad usage: a file, key or value that is not what advcli expects.

    The message is shown to the user as it is, so it names the file, key or value and says what
    was expected.
    """
