"""User-facing errors: the CLI prints their message as one line and exits non-zero, no traceback."""


class DefectscanError(Exception):
    """A problem with the user's input (file, option, checkpoint) rather than a bug in defectscan."""
