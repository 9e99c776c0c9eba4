"""The one exception family the CLI turns into a one-line message and exit status 2."""


class LeafeError(Exception):
    """Bad input or a failed precondition; the message names the problem and the fix."""


class CorruptFile(LeafeError, ValueError):
    """A file leafe reads is not what it should be (truncated, not JSON, not the record it expects)."""
