"""The one error type a stage raises for a failed run: the CLI prints its message and exits 1."""


class StageError(Exception):
    """A run failed for a reason the user can fix; the message names the file, record or key and the fix."""
