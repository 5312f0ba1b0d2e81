"""Errors a user can act on. Each carries a one-line message naming the cause and the fix;
the CLI prints it and exits with code 2, never a traceback."""


class ScanError(Exception):
    """A bad input or environment problem the user can fix (exit code 2)."""

    exit_code = 2


class UnsupportedModelError(ScanError):
    """The source is a model kind terd-scan cannot scan: never reported as clean."""


class UnsafeFileError(ScanError):
    """A file that could run code when loaded (a pickle) and was refused."""
