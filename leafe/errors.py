"""The one exception family the CLI turns into a one-line message and exit status 2."""


class LeafeError(Exception):
    """Bad input or a failed precondition; the message names the problem and the fix."""


class CorruptFile(LeafeError, ValueError):
    """A file leafe reads is not what it should be (truncated, not JSON, not the record it expects)."""


class DiskFull(LeafeError):
    """A write met a full disk (ENOSPC) or a full quota (EDQUOT). The writer kept nothing half-written,
    so once space is freed a rerun resumes where the run stopped."""

    def __init__(self, path: object = None, quota: bool = False):
        what = "disk quota exceeded" if quota else "no space left on device"
        super().__init__(f"{f'{path}: ' if path else ''}{what}; free space and rerun: the run resumes")
        self.path = path
