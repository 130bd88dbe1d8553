"""User-facing errors: the CLI prints their message as one line and exits non-zero, no traceback."""


class DefectscanError(Exception):
    """A problem with the user's input (file, option, checkpoint) rather than a bug in defectscan."""


def one_line(exc: BaseException, *, last: bool = False) -> str:
    """A library exception's message as one line for a `DefectscanError`: its first non-empty line (`last`: its
    last, where a wrapper ends with the original error, as Ray's do), or the exception's type when it has none."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return (lines[-1] if last else lines[0]) if lines else type(exc).__name__
