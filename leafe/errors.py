"""The one exception family the CLI turns into a one-line message and a non-zero exit."""


class LeafeError(Exception):
    """Bad input or a failed precondition; the message names the problem and the fix."""
